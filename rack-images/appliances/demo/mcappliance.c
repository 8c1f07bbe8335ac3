/*
 * mcappliance: the meshcloud demo appliance's one program.
 *
 * - Every 100 ms it appends a counter record (sequence number + wall-clock
 *   time, CRC32-protected) to the data disk with O_DIRECT|O_DSYNC. The
 *   counter advances only after the write returned: a record is durable
 *   before the next one is made. The last durable record is what GET /counter
 *   reports.
 * - Optionally (--write-mbps N) it writes N MB/s of pseudo-random data to
 *   the data region of the disk, for the replication benchmarks.
 * - It serves a small HTTP status page.
 *
 * The on-disk layout is documented in docs/appliance.md and read back by the
 * host with meshcloud.images.appliance.read_counter_from_image(). Keep the
 * two in step: LAYOUT_VERSION below and there.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define SECTOR 512
#define LAYOUT_VERSION 1
#define HEADER_MAGIC "MCDISK01"
#define RECORD_MAGIC "MCCNTR01"
#define RECORD_SIZE 512
#define LOG_OFFSET 4096ULL
#define LOG_SLOTS 8192ULL
#define DATA_OFFSET (16ULL << 20)
#define TICK_NS 100000000LL
#define CHUNK (64 * 1024)

static const char *disk_path = "/dev/vda";
static const char *name = "appliance";
static const char *ip = "";
static int port = 80;
static long write_mbps;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t durable_seq;     /* last record known durable */
static uint64_t durable_time_ns; /* its timestamp */
static uint64_t boot_seq;        /* first seq written by this boot */
static uint64_t write_errors;
static uint64_t random_bytes;
static char disk_status[128] = "starting";
static uint64_t disk_bytes;

static void logmsg(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("mcappliance: ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    fflush(stdout);
    va_end(ap);
}

/* CRC-32 (IEEE 802.3, as zlib.crc32). */
static uint32_t crc_table[256];
static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}
static uint32_t crc32(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFU;
    while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFU;
}

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_u32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static uint64_t now_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void set_disk_status(const char *s) {
    pthread_mutex_lock(&lock);
    snprintf(disk_status, sizeof disk_status, "%s", s);
    pthread_mutex_unlock(&lock);
}

static void make_header(unsigned char *b) {
    memset(b, 0, SECTOR);
    memcpy(b, HEADER_MAGIC, 8);
    put_u32(b + 8, LAYOUT_VERSION);
    put_u32(b + 12, RECORD_SIZE);
    put_u64(b + 16, LOG_OFFSET);
    put_u64(b + 24, LOG_SLOTS);
    put_u64(b + 32, DATA_OFFSET);
    put_u32(b + 508, crc32(b, 508));
}

static int record_valid(const unsigned char *r, uint64_t *seq, uint64_t *t) {
    if (memcmp(r, RECORD_MAGIC, 8) != 0) return 0;
    if (get_u32(r + 508) != crc32(r, 508)) return 0;
    *seq = get_u64(r + 8);
    *t = get_u64(r + 16);
    return *seq > 0;
}

/* Open the disk, write the header if the disk is blank, find the last record. */
static int open_disk(uint64_t *last_seq, uint64_t *last_t) {
    int fd = open(disk_path, O_RDWR | O_DIRECT | O_DSYNC);
    if (fd < 0) {
        logmsg("cannot open %s: %s", disk_path, strerror(errno));
        return -1;
    }
    if (ioctl(fd, BLKGETSIZE64, &disk_bytes) != 0) disk_bytes = 0;
    if (disk_bytes < DATA_OFFSET + CHUNK) {
        logmsg("%s is too small (%llu bytes)", disk_path, (unsigned long long)disk_bytes);
        close(fd);
        return -1;
    }
    unsigned char *buf;
    if (posix_memalign((void **)&buf, 4096, CHUNK) != 0) return -1;
    if (pread(fd, buf, SECTOR, 0) != SECTOR) {
        logmsg("cannot read the header: %s", strerror(errno));
        free(buf);
        close(fd);
        return -1;
    }
    unsigned char want[SECTOR];
    make_header(want);
    if (memcmp(buf, want, SECTOR) != 0) {
        int blank = 1;
        for (int i = 0; i < SECTOR; i++) blank &= buf[i] == 0;
        if (!blank) {
            logmsg("%s holds something that is not a meshcloud counter disk; refusing to touch it",
                   disk_path);
            free(buf);
            close(fd);
            return -1;
        }
        memcpy(buf, want, SECTOR);
        if (pwrite(fd, buf, SECTOR, 0) != SECTOR) {
            logmsg("cannot write the header: %s", strerror(errno));
            free(buf);
            close(fd);
            return -1;
        }
        logmsg("formatted %s (layout %d)", disk_path, LAYOUT_VERSION);
    }
    *last_seq = 0;
    *last_t = 0;
    for (uint64_t off = 0; off < LOG_SLOTS * RECORD_SIZE; off += CHUNK) {
        if (pread(fd, buf, CHUNK, (off_t)(LOG_OFFSET + off)) != CHUNK) {
            logmsg("cannot read the log: %s", strerror(errno));
            free(buf);
            close(fd);
            return -1;
        }
        for (int i = 0; i < CHUNK; i += RECORD_SIZE) {
            uint64_t s, t;
            if (record_valid(buf + i, &s, &t) && s > *last_seq) {
                *last_seq = s;
                *last_t = t;
            }
        }
    }
    free(buf);
    return fd;
}

static void *counter_thread(void *arg) {
    (void)arg;
    uint64_t seq, t;
    int fd;
    while ((fd = open_disk(&seq, &t)) < 0) {
        set_disk_status("no usable data disk (see the console log)");
        sleep(2);
    }
    pthread_mutex_lock(&lock);
    durable_seq = seq;
    durable_time_ns = t;
    boot_seq = seq + 1;
    snprintf(disk_status, sizeof disk_status, "ok");
    pthread_mutex_unlock(&lock);
    logmsg("counter resumes after seq %llu", (unsigned long long)seq);

    unsigned char *rec;
    if (posix_memalign((void **)&rec, 4096, RECORD_SIZE) != 0) return NULL;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        uint64_t want = seq + 1;
        memset(rec, 0, RECORD_SIZE);
        memcpy(rec, RECORD_MAGIC, 8);
        put_u64(rec + 8, want);
        uint64_t ts = now_ns(CLOCK_REALTIME);
        put_u64(rec + 16, ts);
        put_u32(rec + 508, crc32(rec, 508));
        off_t off = (off_t)(LOG_OFFSET + (want % LOG_SLOTS) * RECORD_SIZE);
        ssize_t n = pwrite(fd, rec, RECORD_SIZE, off);
        if (n == RECORD_SIZE) {
            /* O_DSYNC: the record is on stable storage; only now advance. */
            seq = want;
            pthread_mutex_lock(&lock);
            durable_seq = seq;
            durable_time_ns = ts;
            pthread_mutex_unlock(&lock);
        } else {
            pthread_mutex_lock(&lock);
            write_errors++;
            pthread_mutex_unlock(&lock);
            logmsg("write of seq %llu failed: %s", (unsigned long long)want,
                   n < 0 ? strerror(errno) : "short write");
        }
        next.tv_nsec += TICK_NS;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > next.tv_sec + 1) next = now; /* fell far behind: do not burst */
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    return NULL;
}

static uint64_t rng_state;
static uint64_t rng_next(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static void *random_writer_thread(void *arg) {
    (void)arg;
    uint64_t size = 0;
    for (;;) { /* wait until the counter thread accepted the disk */
        pthread_mutex_lock(&lock);
        if (boot_seq > 0) size = disk_bytes;
        pthread_mutex_unlock(&lock);
        if (size > 0) break;
        sleep(1);
    }
    int fd;
    while ((fd = open(disk_path, O_RDWR | O_DIRECT)) < 0) sleep(1);
    uint64_t chunks = (size - DATA_OFFSET) / CHUNK;
    unsigned char *buf;
    if (posix_memalign((void **)&buf, 4096, CHUNK) != 0) return NULL;
    rng_state = now_ns(CLOCK_REALTIME) | 1;
    double bytes_per_tick = (double)write_mbps * 1e6 / 10.0;
    double budget = 0;
    int ticks = 0;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    logmsg("writing %ld MB/s of random data to %s", write_mbps, disk_path);
    for (;;) {
        budget += bytes_per_tick;
        while (budget >= CHUNK) {
            uint64_t *w = (uint64_t *)buf;
            for (size_t i = 0; i < CHUNK / 8; i++) w[i] = rng_next();
            off_t off = (off_t)(DATA_OFFSET + (rng_next() % chunks) * CHUNK);
            if (pwrite(fd, buf, CHUNK, off) == CHUNK) {
                pthread_mutex_lock(&lock);
                random_bytes += CHUNK;
                pthread_mutex_unlock(&lock);
            }
            budget -= CHUNK;
        }
        if (++ticks % 10 == 0) fdatasync(fd);
        next.tv_nsec += TICK_NS;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > next.tv_sec + 1) {
            next = now;
            budget = 0;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    return NULL;
}

static void send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) return;
        p += w;
        n -= (size_t)w;
    }
}

static void respond(int fd, int code, const char *reason, const char *type, const char *body) {
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
                     code, reason, type, strlen(body));
    send_all(fd, head, (size_t)n);
    send_all(fd, body, strlen(body));
}

static void handle(int fd) {
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char req[2048];
    size_t got = 0;
    while (got < sizeof req - 1) {
        ssize_t r = recv(fd, req + got, sizeof req - 1 - got, 0);
        if (r <= 0) break;
        got += (size_t)r;
        req[got] = 0;
        if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n")) break;
    }
    req[got] = 0;
    char path[256] = "";
    if (sscanf(req, "GET %255s", path) != 1) {
        respond(fd, 400, "Bad Request", "text/plain", "bad request\n");
        return;
    }
    pthread_mutex_lock(&lock);
    uint64_t seq = durable_seq, t = durable_time_ns, first = boot_seq, errs = write_errors;
    uint64_t rnd = random_bytes;
    char status[128];
    snprintf(status, sizeof status, "%s", disk_status);
    pthread_mutex_unlock(&lock);
    uint64_t up = now_ns(CLOCK_BOOTTIME) / 1000000ULL;
    char body[2048];
    if (strcmp(path, "/counter") == 0 && first == 0) {
        /* The disk is not read yet: there is no durable value to report. */
        snprintf(body, sizeof body, "{\"name\": \"%s\", \"error\": \"%s\"}\n", name, status);
        respond(fd, 503, "Service Unavailable", "application/json", body);
    } else if (strcmp(path, "/counter") == 0) {
        snprintf(body, sizeof body,
                 "{\"name\": \"%s\", \"seq\": %llu, \"timestamp\": %llu.%09llu}\n", name,
                 (unsigned long long)seq, (unsigned long long)(t / 1000000000ULL),
                 (unsigned long long)(t % 1000000000ULL));
        respond(fd, 200, "OK", "application/json", body);
    } else if (strcmp(path, "/status") == 0) {
        snprintf(body, sizeof body,
                 "{\"name\": \"%s\", \"ip\": \"%s\", \"seq\": %llu, \"timestamp\": "
                 "%llu.%09llu, \"boot_seq\": %llu, \"write_errors\": %llu, \"disk\": \"%s\", "
                 "\"write_mbps\": %ld, \"random_bytes\": %llu, \"uptime_ms\": %llu, "
                 "\"layout\": %d}\n",
                 name, ip, (unsigned long long)seq, (unsigned long long)(t / 1000000000ULL),
                 (unsigned long long)(t % 1000000000ULL), (unsigned long long)first,
                 (unsigned long long)errs, status, write_mbps, (unsigned long long)rnd,
                 (unsigned long long)up, LAYOUT_VERSION);
        respond(fd, 200, "OK", "application/json", body);
    } else if (strcmp(path, "/") == 0 || strcmp(path, "/index.html") == 0) {
        snprintf(body, sizeof body,
                 "<!doctype html><html><head><meta charset=\"utf-8\"><title>%s</title></head>"
                 "<body><h1>meshcloud demo appliance %s</h1><table>"
                 "<tr><th>address</th><td>%s</td></tr>"
                 "<tr><th>durable counter</th><td>%llu</td></tr>"
                 "<tr><th>first counter this boot</th><td>%llu</td></tr>"
                 "<tr><th>data disk</th><td>%s</td></tr>"
                 "<tr><th>write errors</th><td>%llu</td></tr>"
                 "<tr><th>random writes</th><td>%ld MB/s, %llu bytes so far</td></tr>"
                 "<tr><th>uptime</th><td>%llu ms</td></tr></table>"
                 "<p>JSON: <a href=\"/counter\">/counter</a>, <a href=\"/status\">/status</a></p>"
                 "</body></html>\n",
                 name, name, ip, (unsigned long long)seq, (unsigned long long)first, status,
                 (unsigned long long)errs, write_mbps, (unsigned long long)rnd,
                 (unsigned long long)up);
        respond(fd, 200, "OK", "text/html; charset=utf-8", body);
    } else {
        respond(fd, 404, "Not Found", "text/plain", "not found: try /, /counter or /status\n");
    }
}

/* Keep only characters that are safe in HTML and JSON (names are validated on the host too). */
static const char *sanitize(const char *s) {
    static const char ok[] = "abcdefghijklmnopqrstuvwxyz0123456789-./:";
    char *out = strdup(s);
    for (char *p = out; *p; p++)
        if (!strchr(ok, *p)) *p = '_';
    if (strlen(out) > 63) out[63] = 0;
    return out;
}

int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--disk")) disk_path = argv[i + 1];
        else if (!strcmp(argv[i], "--name")) name = sanitize(argv[i + 1]);
        else if (!strcmp(argv[i], "--ip")) ip = sanitize(argv[i + 1]);
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--write-mbps")) write_mbps = atol(argv[i + 1]);
        else {
            fprintf(stderr, "usage: mcappliance [--disk DEV] [--name N] [--ip IP] [--port P]"
                            " [--write-mbps N]\n");
            return 2;
        }
    }
    if (port <= 0 || port > 65535) port = 80;
    if (write_mbps < 0) write_mbps = 0;
    if (write_mbps > 1000) write_mbps = 1000;
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    crc_init();

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 16) != 0) {
        logmsg("cannot listen on port %d: %s", port, strerror(errno));
        return 1;
    }
    pthread_t t1, t2;
    pthread_create(&t1, NULL, counter_thread, NULL);
    if (write_mbps > 0) pthread_create(&t2, NULL, random_writer_thread, NULL);
    logmsg("serving http on port %d as %s (%s)", port, name, ip);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        handle(c);
        close(c);
    }
}
