// The cluster screens: overview, racks, appliances, events, topology.
// Each view is a function (state, ctx) -> Node; ctx has api(), can(role), notice().
import { h, s, t, tn, badge, icon, field, fmtSeconds, fmtMiB, fmtTime, percent } from "./ui.js";

// -- the model: plain data derived from the cluster document ---------------------------

/** Racks with their health, load and what runs on them. */
export function rackModel(doc) {
  const health = (doc.health && doc.health.racks) || {};
  const out = [];
  for (const [name, rack] of Object.entries(doc.racks || {})) {
    const hl = health[name] || {};
    const used = { vcpus: 0, memory_mib: 0 };
    const runs = [];
    for (const a of Object.values(doc.assignments || {})) {
      if (a.primary === name && a.state === "running") {
        const spec = (doc.appliances || {})[a.appliance];
        if (spec) {
          used.vcpus += spec.vcpus;
          used.memory_mib += spec.memory_mib;
        }
        runs.push(a.appliance);
      }
    }
    let level, words;
    if (hl.state === "lost") [level, words] = ["bad", t("rack_lost")];
    else if (rack.drained) [level, words] = ["warn", t("rack_drained")];
    else if (hl.state === "alive") [level, words] = ["ok", t("rack_alive")];
    else [level, words] = ["unknown", t("rack_member")];
    out.push({
      name, site: rack.site, rack, health: hl, used, runs, level, words,
      leader: doc.leader === name, voter: !!hl.voter, power: powerModel(rack.power),
    });
  }
  return out;
}

/** A rack's power from its report (docs/power.md): {level, words, left}. */
export function powerModel(power) {
  if (!power) return { level: "unknown", words: t("power_unknown"), left: "" };
  let level, words, left = "";
  if (power.on_battery) {
    if (typeof power.runtime_s === "number") left = t("power_left", { left: fmtSeconds(power.runtime_s) });
    else if (typeof power.charge_pct === "number") left = t("power_charge", { pct: Math.round(power.charge_pct) });
    level = power.evacuating ? "bad" : "warn";
    words = t(power.evacuating ? "power_evacuating" : "power_battery", { left: left || "—" });
    if (power.low_battery) words += ` · ${t("power_low")}`;
  } else {
    level = "ok";
    if (power.source === "mains") words = t("power_mains_no_ups");
    else if (typeof power.charge_pct === "number") words = t("power_mains_charge", { pct: Math.round(power.charge_pct) });
    else words = t("power_mains_ups");
  }
  if (power.error) {
    if (level === "ok") level = "warn";
    words += ` · ${t("power_unreadable", { error: power.error })}`;
  }
  return { level, words, left };
}

/** Appliances with where they run, their replicas and how far behind each is. */
export function applianceModel(doc) {
  const racks = Object.fromEntries(rackModel(doc).map((r) => [r.name, r]));
  const gens = doc.replica_generations || {};
  return Object.values(doc.appliances || {}).map((spec) => {
    const a = (doc.assignments || {})[spec.name];
    const g = gens[spec.name] || {};
    const primaryGen = a && a.primary ? g[a.primary] : undefined;
    const replicas = (a ? a.replicas : []).map((r) => {
      const gen = g[r];
      const lag = typeof gen === "number" && typeof primaryGen === "number" ? Math.max(0, primaryGen - gen) : null;
      return { rack: r, gen: typeof gen === "number" ? gen : null, lag, level: racks[r] ? racks[r].level : "unknown" };
    });
    let level, words;
    if (!a) [level, words] = ["warn", t("app_unplaced")];
    else if (a.state === "stopped") [level, words] = ["warn", t("app_stopped")];
    else if (a.state === "waiting" || !a.primary) [level, words] = ["bad", t("app_waiting")];
    else if (racks[a.primary] && racks[a.primary].level === "bad") [level, words] = ["bad", t("app_rack_lost", { rack: a.primary })];
    else [level, words] = ["ok", t("app_running", { rack: a.primary })];
    const short = a && a.state === "running" && a.replicas.length < spec.replicas;
    return { spec, a, replicas, level, words, short, primaryGen };
  });
}

const LEVEL_ORDER = { bad: 0, warn: 1, unknown: 2, ok: 3 };
export const SEVERITY_LEVEL = { info: "ok", warning: "warn", critical: "bad" };

/** What needs attention, most urgent first: [{level, text, href}]. */
export function attention(doc, diverged) {
  const items = [];
  for (const c of diverged || []) {
    if (!c.discard) items.push({ level: "warn", text: t("att_kept", { app: c.appliance, rack: c.rack }), href: "#/appliances" });
  }
  if (!doc.leader) items.push({ level: "bad", text: t("att_no_leader"), href: "#/racks" });
  for (const r of rackModel(doc)) {
    if (r.level === "bad") items.push({ level: "bad", text: t("att_rack_lost", { rack: r.name, age: fmtSeconds(r.health.lease_age_s) }), href: "#/racks" });
    else if (r.level === "warn") items.push({ level: "warn", text: t("att_rack_drained", { rack: r.name }), href: "#/racks" });
    if (r.level === "bad") continue;  // a lost rack's last power report is history
    const p = r.rack.power;
    if (p && p.on_battery) {
      const key = p.evacuating ? "att_rack_evacuating" : "att_rack_battery";
      items.push({ level: r.power.level, text: t(key, { rack: r.name, left: r.power.left || t("power_low") }), href: "#/racks" });
    } else if (p && p.error) {
      items.push({ level: "warn", text: t("att_rack_ups", { rack: r.name, error: p.error }), href: "#/racks" });
    }
  }
  for (const m of applianceModel(doc)) {
    if (m.level === "bad" || m.level === "warn") {
      const reason = m.a && m.a.reason ? ` — ${m.a.reason}` : "";
      items.push({ level: m.level, text: `${m.spec.name}: ${m.words}${reason}`, href: "#/appliances" });
    } else if (m.short) {
      items.push({ level: "warn", text: t("att_short", { app: m.spec.name, have: m.replicas.length, want: m.spec.replicas }), href: "#/appliances" });
    }
  }
  return items.sort((x, y) => LEVEL_ORDER[x.level] - LEVEL_ORDER[y.level]);
}

function worst(levels) {
  return levels.reduce((w, l) => (LEVEL_ORDER[l] < LEVEL_ORDER[w] ? l : w), "ok");
}

function waiting() {
  return h("div", { class: "empty" }, h("div", { class: "spinner", "aria-hidden": "true" }), h("p", {}, t("waiting_for_data")));
}

// -- overview -------------------------------------------------------------------------

export function overview(state) {
  const doc = state.cluster;
  if (!doc) return waiting();
  const items = attention(doc, state.diverged);
  const racks = rackModel(doc);
  const apps = applianceModel(doc);
  const level = items.length ? worst(items.map((i) => i.level)) : racks.some((r) => r.level === "unknown") ? "ok" : "ok";
  const headline = items.length ? tn("att_count", items.length) : t("all_well");
  return h("section", { class: "view" },
    h("div", { class: `summary ${level}`, "data-testid": "summary" }, icon(level), h("p", {}, headline)),
    items.length ? h("section", {},
      h("h2", {}, t("needs_attention")),
      h("ol", { class: "attention" }, items.map((i) => h("li", { class: i.level }, badge(i.level, ""), h("a", { href: i.href }, i.text))))) : null,
    h("section", {},
      h("h2", {}, h("a", { href: "#/racks" }, tn("racks_count", racks.length))),
      h("ul", { class: "tiles" }, racks.map((r) => h("li", { class: `tile ${r.level}`, "data-rack": r.name },
        h("strong", {}, r.name), " ", badge(r.level, r.words),
        r.power.level === "warn" || r.power.level === "bad" ? [" ", badge(r.power.level, r.power.words)] : null,
        h("small", {}, t("site_is", { site: r.site }), r.leader ? ` · ${t("leader")}` : ""))))),
    h("section", {},
      h("h2", {}, h("a", { href: "#/appliances" }, tn("apps_count", apps.length))),
      apps.length ? h("ul", { class: "tiles" }, apps.map((m) => h("li", { class: `tile ${m.level}`, "data-app": m.spec.name },
        h("strong", {}, m.spec.name), " ", badge(m.level, m.words)))) : h("p", { class: "muted" }, t("no_apps"))),
  );
}

// -- racks ----------------------------------------------------------------------------

/** A link to the leader's own console (it alone knows which racks are alive). */
function leaderLink(doc) {
  const r = doc.leader && (doc.racks || {})[doc.leader];
  if (!r || !r.address || !r.api_port) return null;
  const host = r.address.includes(":") ? `[${r.address}]` : r.address;
  return h("a", { href: `${location.protocol}//${host}:${r.api_port}/` }, t("open_leader", { rack: doc.leader }));
}

export function racksView(state, ctx) {
  const doc = state.cluster;
  if (!doc) return waiting();
  const racks = rackModel(doc);
  return h("section", { class: "view" },
    h("p", { class: "muted" }, doc.leader ? t("leader_is", { rack: doc.leader, answered: doc.answered_by }) : t("att_no_leader")),
    racks.some((r) => r.level === "unknown") ? h("p", { class: "note" }, t("member_note", { leader: doc.leader || "—" }), " ", leaderLink(doc)) : null,
    h("ul", { class: "cards" }, racks.map((r) => h("li", { class: `card ${r.level}`, "data-rack": r.name },
      h("h2", {}, r.name, " ", badge(r.level, r.words)),
      h("dl", {},
        field(t("site"), r.site),
        field(t("lease_age"), fmtSeconds(r.health.lease_age_s)),
        field(t("load_cpu"), `${r.used.vcpus} / ${r.rack.capacity.vcpus} (${percent(r.used.vcpus, r.rack.capacity.vcpus)})`),
        field(t("load_mem"), `${fmtMiB(r.used.memory_mib)} / ${fmtMiB(r.rack.capacity.memory_mib)} (${percent(r.used.memory_mib, r.rack.capacity.memory_mib)})`),
        field(t("power"), badge(r.power.level, r.power.words)),
        field(t("role"), [r.leader ? t("leader") : null, r.voter ? t("voter") : t("follower")].filter(Boolean).join(", ")),
        field(t("address"), r.rack.address ? `${r.rack.address}:${r.rack.api_port}` : "—"),
        field(t("runs"), r.runs.length ? r.runs.join(", ") : "—"),
        field(t("links"), r.leader ? t("links_leader") : r.health.state ? t("links_to_leader", { leader: doc.leader || "—", state: r.words }) : "—"),
      ),
      ctx.can("operator") ? h("div", { class: "actions" },
        r.rack.drained
          ? h("button", { onclick: () => ctx.act("POST", `/api/v1/racks/${r.name}/undrain`, null, t("done_undrain", { rack: r.name })) }, t("undrain"))
          : h("button", { onclick: () => ctx.confirm(t("confirm_drain", { rack: r.name })) && ctx.act("POST", `/api/v1/racks/${r.name}/drain`, null, t("done_drain", { rack: r.name })) }, t("drain"))) : null,
    ))),
  );
}

// -- appliances -----------------------------------------------------------------------

function replicaList(m) {
  if (!m.replicas.length) return "—";
  return h("ul", { class: "plain" }, m.replicas.map((r) => h("li", {},
    badge(r.level, r.rack), " ",
    r.gen === null ? t("gen_unknown") : r.lag === null ? t("gen", { gen: r.gen }) : t("gen_lag", { gen: r.gen, lag: r.lag }))));
}

/** The assignment's planned move, in words (under way, done with its downtime, or abandoned). */
function moveWords(mv) {
  if (!mv) return null;
  if (mv.phase === "done") return t("move_done_words", { source: mv.source, rack: mv.to, down: fmtSeconds(mv.downtime_s) });
  if (mv.phase === "abandoned") return t("move_abandoned_words", { rack: mv.to, reason: mv.reason });
  return t(`move_${mv.phase}_words`, { source: mv.source, rack: mv.to });
}

/** Start / stop / move for an operator: a planned move goes to a replica holder. */
function applianceActions(m, ctx) {
  const name = m.spec.name;
  const a = m.a;
  const stopped = !!a && a.state === "stopped";
  const moving = !!(a && a.move && (a.move.phase === "handover" || a.move.phase === "synced"));
  const holders = m.replicas.map((r) => r.rack);
  const target = h("select", { "aria-label": t("move_to", { app: name }), "data-testid": "move-to", disabled: stopped || moving || !holders.length },
    h("option", { value: "" }, t("move_best")),
    holders.map((r) => h("option", { value: r }, r)));
  return [
    stopped
      ? h("button", { "data-action": "start", onclick: () => ctx.act("POST", `/api/v1/appliances/${name}/start`, null, t("done_start", { app: name })) }, t("start"))
      : h("button", { "data-action": "stop", disabled: !a, onclick: () => ctx.confirm(t("confirm_stop", { app: name })) && ctx.act("POST", `/api/v1/appliances/${name}/stop`, null, t("done_stop", { app: name })) }, t("stop")),
    target,
    h("button", {
      "data-action": "move",
      disabled: stopped || moving || !holders.length,
      title: holders.length ? null : t("move_no_replica"),
      onclick: () => ctx.confirm(t("confirm_move", { app: name, rack: target.value || t("move_best") })) &&
        ctx.act("POST", `/api/v1/appliances/${name}/move`, target.value ? { to: target.value } : null, t("done_move", { app: name })),
    }, t("move")),
  ];
}

/** The newest event about appliance `name` (by its field, or naming it in the sentence). */
export function latestAbout(events, name) {
  const word = new RegExp(`(^|[^a-z0-9-])${name}($|[^a-z0-9-])`);
  let best = null;
  for (const e of events) {
    if ((e.appliance === name || word.test(e.message)) && (!best || (e.at || 0) >= (best.at || 0))) best = e;
  }
  return best;
}

export function appliancesView(state, ctx) {
  const doc = state.cluster;
  if (!doc) return waiting();
  const apps = applianceModel(doc);
  const op = ctx.can("operator");
  return h("section", { class: "view" },
    keptAside(state.diverged, ctx),
    apps.length ? null : h("p", { class: "muted" }, t("no_apps")),
    h("ul", { class: "cards" }, apps.map((m) => h("li", { class: `card ${m.level}`, "data-app": m.spec.name },
      h("h2", {}, m.spec.name, " ", badge(m.level, m.words)),
      h("dl", {},
        field(t("runs_on"), m.a && m.a.primary ? m.a.primary : "—"),
        field(t("state"), m.a ? t(`state_${m.a.state}`) : "—"),
        field(t("reason"), m.a && m.a.reason ? m.a.reason : "—"),
        field(t("latest"), ((e) => (e ? [h("time", {}, fmtTime(e.at)), " ", e.rack, ": ", e.message] : "—"))(latestAbout(state.events, m.spec.name))),
        field(t("replicas"), replicaList(m)),
        field(t("replicas_wanted"), String(m.spec.replicas)),
        field(t("priority"), String(m.spec.priority)),
        field(t("size"), `${m.spec.vcpus} vCPU, ${fmtMiB(m.spec.memory_mib)}`),
        field(t("image"), m.spec.image),
        field(t("epoch"), m.a ? String(m.a.epoch) : "—"),
        m.a && m.a.move ? field(t("last_move"), h("span", { "data-testid": "move" }, moveWords(m.a.move))) : null,
      ),
      op ? h("div", { class: "actions" },
        applianceActions(m, ctx),
        h("button", { onclick: () => ctx.edit(m.spec) }, t("edit")),
        h("button", { class: "danger", onclick: () => ctx.confirm(t("confirm_delete", { app: m.spec.name })) && ctx.act("DELETE", `/api/v1/appliances/${m.spec.name}`, null, t("done_delete", { app: m.spec.name })) }, t("delete"))) : null,
    ))),
  );
}

/** Copies racks kept aside after a failover: writes the cluster does not have. */
export function keptAside(copies, ctx) {
  if (!copies || !copies.length) return null;
  return h("section", { class: "kept", "data-testid": "kept-aside" },
    h("h2", {}, t("kept_title")),
    h("p", { class: "muted" }, t("kept_help")),
    h("ul", { class: "cards" }, copies.map((c) => h("li", { class: `card ${c.discard ? "unknown" : "warn"}` },
      h("h2", {}, c.appliance, " ", badge(c.discard ? "unknown" : "warn", c.discard ? t("kept_discarding") : t("kept_on", { rack: c.rack }))),
      h("dl", {},
        field(t("kept_writes"), t("kept_generations", { from: c.common_generation + 1, to: c.last_generation })),
        field(t("kept_when"), `${fmtTime(c.first_write_at)} – ${fmtTime(c.last_write_at)}`),
        field(t("size"), fmtMiB(Math.round(c.bytes / 1048576))),
        field(t("reason"), c.reason || "—"),
        field("id", c.id)),
      ctx.can("operator") && !c.discard ? h("div", { class: "actions" },
        h("button", { class: "danger", onclick: () => ctx.confirm(t("kept_confirm", { app: c.appliance, rack: c.rack })) &&
          ctx.act("DELETE", `/api/v1/diverged/${c.rack}/${encodeURIComponent(c.id)}`, null, t("kept_done")) }, t("kept_discard"))) : null))));
}

// -- events ---------------------------------------------------------------------------


/** The filter controls: built once per visit, so typing is never interrupted. */
export function eventFilters(state, ctx) {
  const f = state.filter;
  return h("form", { class: "filters no-print", onsubmit: (e) => e.preventDefault() },
    h("label", {}, t("filter_severity"), " ",
      h("select", { name: "severity", onchange: (e) => ctx.setFilter({ severity: e.target.value }) },
        ["", "critical", "warning", "info"].map((v) => h("option", { value: v, selected: f.severity === v }, v ? t(`sev_${v}`) : t("all"))))),
    h("label", {}, t("filter_text"), " ",
      h("input", { name: "text", type: "search", value: f.text, oninput: (e) => ctx.setFilter({ text: e.target.value }) })),
    h("button", { type: "button", onclick: () => window.print() }, t("print_report")));
}

export function eventsView(state) {
  const f = state.filter;
  const needle = f.text.trim().toLowerCase();
  const shown = state.events
    .filter((e) => !f.severity || e.severity === f.severity)
    .filter((e) => !needle || `${e.rack} ${e.kind} ${e.message} ${e.appliance || ""}`.toLowerCase().includes(needle))
    .slice()
    .sort((a, b) => (b.at || 0) - (a.at || 0) || b.seq - a.seq);
  const doc = state.cluster;
  const items = doc ? attention(doc, state.diverged) : [];
  return h("section", { class: "view" },
    h("div", { class: "print-only report-head" },
      h("h2", {}, t("incident_report")),
      h("p", {}, t("report_line", { cluster: doc ? doc.cluster_id : "—", rack: doc ? doc.answered_by : "—", at: fmtTime(Date.now() / 1000) })),
      items.length ? h("ul", {}, items.map((i) => h("li", {}, `[${t(`level_${i.level}`)}] ${i.text}`))) : h("p", {}, t("all_well"))),
    h("p", { class: "muted" }, tn("events_count", shown.length)),
    h("ol", { class: "events", "data-testid": "events" }, shown.map((e) => h("li", { class: SEVERITY_LEVEL[e.severity] || "ok" },
      badge(SEVERITY_LEVEL[e.severity] || "ok", t(`sev_${e.severity}`)),
      h("time", {}, fmtTime(e.at)), " ",
      h("span", { class: "rack" }, e.rack), " ",
      h("span", { class: "msg" }, e.message)))));
}

// -- topology -------------------------------------------------------------------------

export function topologyView(state) {
  const doc = state.cluster;
  if (!doc) return waiting();
  const racks = rackModel(doc);
  const sites = [...new Set(racks.map((r) => r.site))].sort();
  const W = 640, H = 420, cx = W / 2, cy = H / 2 + 10;
  const pos = {};
  const R = racks.length > 1 ? 150 : 0;
  racks.forEach((r, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, racks.length);
    pos[r.name] = [cx + R * Math.cos(angle), cy + R * Math.sin(angle)];
  });
  const edges = [];
  const leader = racks.find((r) => r.leader);
  if (leader) {
    for (const r of racks) {
      if (r === leader) continue;
      const [x1, y1] = pos[leader.name], [x2, y2] = pos[r.name];
      edges.push(s("line", { x1, y1, x2, y2, class: `edge ${r.level}` }, s("title", {}, t("edge_lease", { rack: r.name, age: fmtSeconds(r.health.lease_age_s) }))));
    }
  }
  const flows = [];
  for (const m of applianceModel(doc)) {
    if (!m.a || !m.a.primary || !pos[m.a.primary]) continue;
    for (const rep of m.replicas) {
      if (!pos[rep.rack]) continue;
      const [x1, y1] = pos[m.a.primary], [x2, y2] = pos[rep.rack];
      flows.push(s("line", { x1, y1, x2, y2, class: "flow" }, s("title", {}, t("edge_replica", { app: m.spec.name, from: m.a.primary, to: rep.rack }))));
    }
  }
  const nodes = racks.map((r) => {
    const [x, y] = pos[r.name];
    const siteIndex = sites.indexOf(r.site);
    return s("g", { class: `node ${r.level}`, transform: `translate(${x.toFixed(1)},${y.toFixed(1)})`, "data-rack": r.name },
      s("rect", { x: -58, y: -30, width: 116, height: 60, rx: 8 }),
      s("use", { href: `#i-${r.level}`, x: -50, y: -22, width: 16, height: 16, class: `icon ${r.level}` }),
      s("text", { x: -30, y: -9, class: "name" }, r.name),
      s("text", { x: 0, y: 9, "text-anchor": "middle" }, r.words),
      s("text", { x: 0, y: 23, "text-anchor": "middle", class: "site" }, `${t("site")} ${r.site}${r.leader ? " ★" : ""}`),
      s("title", {}, `${r.name}: ${r.words}; ${t("site")} ${r.site} (${siteIndex + 1}/${sites.length})`));
  });
  return h("section", { class: "view" },
    h("figure", { class: "topology" },
      s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": t("topology_label", { n: racks.length }) },
        s("g", {}, flows), s("g", {}, edges), s("g", {}, nodes)),
      h("figcaption", {}, t("topology_legend"))),
  );
}
