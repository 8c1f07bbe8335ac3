// The console: session, live updates by server-sent events, routing, rendering.
import { h, t, lang, languages, setCatalog, badge, fmtSeconds } from "./ui.js";
import { overview, racksView, appliancesView, eventsView, eventFilters, topologyView, attention } from "./views.js";
import { loginView, passwordView, usersView, deployForm } from "./manage.js";

const STALE_S = 12; // the server pings every 5 s: this much silence means the stream is dead
const MAX_EVENTS = 500;
const ROLE_RANK = { viewer: 1, operator: 2, admin: 3 };

const state = {
  me: null,
  cluster: null,
  events: [],
  seen: new Set(),
  connected: false,
  lastMessage: 0,
  lastUpdate: 0,
  filter: { severity: "", text: "" },
  diverged: null, // kept-aside copies (GET /api/v1/diverged), when this version has them
  divergedAt: -Infinity,
  editing: null,
};
let source = null;
let renderQueued = false;
let shown = null; // {route, data}: the view on screen; live updates replace only its data

const main = document.getElementById("main");
const banner = document.getElementById("banner");

// -- talking to the rack ----------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined && body !== null) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.me && state.me.csrf) headers["X-CSRF-Token"] = state.me.csrf;
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body == null ? undefined : JSON.stringify(body), credentials: "same-origin" });
  } catch (ex) {
    throw new ApiError(t("err_network"), 0);
  }
  let doc = null;
  try {
    doc = await resp.json();
  } catch (ex) {
    doc = null;
  }
  if (!resp.ok) {
    const message = (doc && doc.error && doc.error.message) || `HTTP ${resp.status}`;
    if (resp.status === 401 && path !== "/api/v1/session") loggedOut();
    throw new ApiError(message, resp.status);
  }
  return doc;
}

async function login(body) {
  state.me = await api("POST", "/api/v1/session", body);
  document.cookie = "mc_in=1; path=/; samesite=strict";
  start();
}

async function logout() {
  try {
    await api("DELETE", "/api/v1/session");
  } catch (ex) {
    /* the session may be gone already */
  }
  loggedOut();
}

function loggedOut() {
  state.me = null;
  document.cookie = "mc_in=; path=/; samesite=strict; max-age=0";
  stopStream();
  state.cluster = null;
  render();
}

// -- live updates -----------------------------------------------------------------------

function addEvent(e) {
  const key = `${e.rack}/${e.kind}/${e.seq}/${e.at}`;
  if (state.seen.has(key)) return;
  state.seen.add(key);
  state.events.push(e);
  if (state.events.length > MAX_EVENTS) {
    const gone = state.events.splice(0, state.events.length - MAX_EVENTS);
    for (const g of gone) state.seen.delete(`${g.rack}/${g.kind}/${g.seq}/${g.at}`);
  }
}

let consoleSeq = 0;

/** Rack losses and returns this console saw happen: kept with the events for the report. */
function noteTransitions(before, after) {
  const old = (before && before.health && before.health.racks) || {};
  for (const [name, hl] of Object.entries((after.health && after.health.racks) || {})) {
    const prev = old[name];
    if (!prev || prev.state === hl.state || (prev.state !== "lost" && hl.state !== "lost")) continue;
    const lost = hl.state === "lost";
    addEvent({
      seq: ++consoleSeq, at: Date.now() / 1000, rack: after.answered_by || "console", kind: "console",
      severity: lost ? "critical" : "info", appliance: null,
      message: lost ? t("seen_lost", { rack: name, age: fmtSeconds(hl.lease_age_s) }) : t("seen_back", { rack: name }),
    });
  }
}

function startStream() {
  stopStream();
  source = new EventSource("/api/v1/events");
  const heard = () => {
    state.lastMessage = performance.now();
    if (!state.connected) {
      state.connected = true;
      showBanner();
    }
  };
  source.addEventListener("open", heard);
  source.addEventListener("ping", heard);
  source.addEventListener("cluster", (m) => {
    heard();
    const doc = JSON.parse(m.data);
    noteTransitions(state.cluster, doc);
    state.cluster = doc;
    state.lastUpdate = performance.now();
    queueRender();
  });
  source.addEventListener("event", (m) => {
    heard();
    addEvent(JSON.parse(m.data));
    queueRender();
  });
  source.addEventListener("error", () => {
    state.connected = false;
    showBanner();
    if (source && source.readyState === EventSource.CLOSED) {
      // the server refused the stream (logged out?) or the rack is gone: ask again later
      setTimeout(checkSessionThenStream, 1500);
    }
  });
}

function stopStream() {
  if (source) source.close();
  source = null;
  state.connected = false;
}

async function checkSessionThenStream() {
  if (!state.me || (source && source.readyState !== EventSource.CLOSED)) return;
  try {
    state.me = await api("GET", "/api/v1/session");
    startStream();
  } catch (ex) {
    if (ex.status !== 401) setTimeout(checkSessionThenStream, 3000);
  }
}

async function refreshDiverged() {
  state.divergedAt = performance.now();
  try {
    state.diverged = (await api("GET", "/api/v1/diverged")).diverged;
  } catch (ex) {
    state.diverged = null; // absent (404) or unreachable: the section stays hidden
  }
  queueRender();
}

function tick() {
  if (state.me && !mustChange() && ["overview", "appliances", "events"].includes(route()) && performance.now() - state.divergedAt > 10000) {
    refreshDiverged();
  }
  if (state.me && source && state.connected && performance.now() - state.lastMessage > STALE_S * 1000) {
    // a half-open connection (the rack lost power, the link dropped): start over
    state.connected = false;
    startStream();
  }
  showBanner();
  const upd = document.getElementById("updated");
  if (upd) upd.textContent = updatedText();
}

function ageS() {
  return state.lastUpdate ? (performance.now() - state.lastUpdate) / 1000 : null;
}

function updatedText() {
  const age = ageS();
  return age === null ? t("not_updated") : t("updated_ago", { age: age < 120 ? t("seconds", { n: Math.floor(age) }) : fmtSeconds(age) });
}

const mustChange = () => !!state.me && state.me.must_change_password && !state.me.emergency;

function showBanner() {
  const down = !!state.me && !mustChange() && !state.connected;
  banner.hidden = !down;
  if (down) banner.replaceChildren(badge("bad", t("conn_lost")), " ", h("span", {}, t("conn_lost_help", { updated: updatedText() })));
  document.body.classList.toggle("offline", down);
}

// -- routing and rendering ----------------------------------------------------------------

const can = (role) => !!state.me && ROLE_RANK[state.me.role] >= ROLE_RANK[role];

const ctx = {
  api,
  login,
  can,
  render: () => render(),
  start: () => start(),
  notice,
  confirm: (q) => window.confirm(q),
  prompt: (q) => window.prompt(q),
  act: async (method, path, body, done) => {
    try {
      await api(method, path, body);
      notice(done);
      if (path.startsWith("/api/v1/diverged")) refreshDiverged();
    } catch (ex) {
      notice(ex.message, true);
    }
  },
  edit: (spec) => {
    state.editing = spec;
    render();
    if (spec) window.scrollTo(0, 0);
  },
  setFilter: (f) => {
    Object.assign(state.filter, f);
    render(true);
  },
};

// Live views: data re-drawn on every update; controls (forms) built once per visit.
const LIVE = {
  overview: (st) => overview(st, ctx),
  racks: (st) => racksView(st, ctx),
  appliances: (st) => appliancesView(st, ctx),
  events: (st) => eventsView(st, ctx),
  topology: (st) => topologyView(st, ctx),
};
const CONTROLS = {
  appliances: (st) => (can("operator") ? deployForm(ctx, st.editing) : null),
  events: (st) => eventFilters(st, ctx),
};
const STATIC = {
  users: (st) => usersView(st, ctx),
  password: (st) => passwordView(st, ctx),
};
const NAV = ["overview", "racks", "appliances", "events", "topology"];

function route() {
  const name = location.hash.replace(/^#\/?/, "") || "overview";
  if (state.me && state.me.must_change_password && !state.me.emergency) return "password";
  if (name in LIVE || (name === "password" && state.me && !state.me.emergency)) return name;
  if (name === "users" && can("admin")) return name;
  return "overview";
}

function notice(text, isError) {
  const el = h("div", { class: `notice ${isError ? "bad" : "ok"}`, role: "status" }, text);
  document.body.append(el);
  setTimeout(() => el.remove(), isError ? 8000 : 4000);
}

function header(current) {
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  const langSelect = h("select", { "aria-label": t("language"), onchange: (e) => switchLanguage(e.target.value) },
    Object.entries(languages).map(([code, name]) => h("option", { value: code, selected: code === lang() }, name)));
  if (!state.me) {
    nav.replaceChildren();
    who.replaceChildren(langSelect);
    return;
  }
  const items = NAV.map((n) => h("a", { href: `#/${n}`, "aria-current": n === current ? "page" : null }, t(`nav_${n}`)));
  if (can("admin")) items.push(h("a", { href: "#/users", "aria-current": current === "users" ? "page" : null }, t("nav_users")));
  const count = state.cluster ? attention(state.cluster, state.diverged).length : 0;
  if (count) items[0].append(h("span", { class: "count", "aria-label": t("needs_attention") }, String(count)));
  nav.replaceChildren(...items);
  who.replaceChildren(
    h("span", { id: "updated", class: "updated" }, updatedText()),
    h("span", { class: "user" }, `${state.me.user} (${t(`role_${state.me.role}`)})`),
    state.me.emergency ? null : h("a", { href: "#/password" }, t("change_password")),
    langSelect,
    h("button", { class: "link", onclick: logout }, t("logout")));
}

function queueRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    render(true);
  });
}

/** Draw the screen. ``live``: only new data arrived, so keep forms and focus as they are. */
function render(live) {
  if (!state.me) {
    header(null);
    if (live && shown && shown.route === "login") return;
    shown = { route: "login" };
    main.replaceChildren(loginView(ctx));
    document.title = `${t("login_title")} · meshcloud`;
    return;
  }
  const name = route();
  header(name);
  const title = t(`nav_${name === "password" ? "overview" : name}`);
  document.title = `${title} · meshcloud`;
  if (live && shown && shown.route === name) {
    if (shown.data) {
      const data = LIVE[name](state);
      shown.data.replaceWith(data);
      shown.data = data;
      shown.footer.textContent = updatedText();
    }
    return;
  }
  if (name in STATIC) {
    shown = { route: name };
    main.replaceChildren(STATIC[name](state));
    return;
  }
  const controls = CONTROLS[name] ? CONTROLS[name](state) : null;
  const data = LIVE[name](state);
  const footer = h("p", { class: "print-only muted" }, updatedText());
  shown = { route: name, data, footer };
  main.replaceChildren(...[h("h1", { class: name === "overview" ? "sr-only" : null }, title), controls, data, footer].filter(Boolean));
}

async function switchLanguage(code) {
  const url = new URL(`./i18n/${code}.json`, import.meta.url);
  const doc = await (await fetch(url)).json();
  setCatalog(code, doc);
  shown = null;
  render();
  showBanner();
}

// -- start ------------------------------------------------------------------------------

function start() {
  shown = null;
  if (mustChange()) stopStream(); // the API refuses everything else until then
  else if (!source) startStream();
  render();
}

window.addEventListener("hashchange", () => {
  shown = null;
  render();
  main.focus({ preventScroll: true });
});
setInterval(tick, 1000);

// "mc_in" (readable by scripts, unlike the session cookie) says a session may exist: without
// it, the login form shows at once, saving a round trip on a slow link.
const MAYBE_IN = "mc_in=1";
if (document.cookie.split("; ").includes(MAYBE_IN)) {
  api("GET", "/api/v1/session").then(
    (me) => {
      state.me = me;
      start();
    },
    () => render(),
  );
} else {
  render();
}
