// Small DOM, translation and formatting helpers shared by every screen.
// Nothing here touches the network; no string reaches innerHTML.

let catalog = JSON.parse(document.getElementById("catalog").textContent);
export const languages = JSON.parse(document.getElementById("languages").textContent);

export function lang() {
  return document.documentElement.lang;
}

/** Switch to another catalog (already fetched) and remember the choice for the next visit. */
export function setCatalog(code, doc) {
  catalog = doc;
  const meta = doc._meta || {};
  document.documentElement.lang = code;
  document.documentElement.dir = meta.dir || "ltr";
  document.cookie = `mc_lang=${code}; path=/; max-age=31536000; samesite=strict`;
}

/** The translation of `key`, with {name} placeholders filled from `params`. */
export function t(key, params) {
  let text = catalog[key];
  if (typeof text !== "string") text = key;
  if (params) text = text.replace(/\{(\w+)\}/g, (m, k) => (k in params ? String(params[k]) : m));
  return text;
}

/** Plural: `key_one` for 1, else `key_other`; {n} is the count. */
export function tn(key, n, params) {
  return t(n === 1 ? `${key}_one` : `${key}_other`, { n, ...params });
}

/** Build an element: h("a", {href: "#", class: "x", onclick: f}, "text", child, ...). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : String(c));
  }
}

const SVG = "http://www.w3.org/2000/svg";

/** An SVG element with attributes and children. */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) el.setAttribute(k, v);
  append(el, children);
  return el;
}

/** The status icon (ok, warn, bad, unknown) from the page's sprite. */
export function icon(level) {
  const use = s("use", { href: `#i-${level}` });
  return s("svg", { class: `icon ${level}`, viewBox: "0 0 16 16", "aria-hidden": "true" }, use);
}

/** A status by icon, colour and words: the words carry the meaning, colour and icon help. */
export function badge(level, words) {
  return h("span", { class: `badge ${level}` }, icon(level), h("span", {}, words));
}

export function fmtSeconds(s) {
  if (typeof s !== "number" || !isFinite(s)) return "—";
  if (s < 10) return t("seconds", { n: s.toFixed(1) });
  if (s < 120) return t("seconds", { n: Math.round(s) });
  if (s < 7200) return t("minutes", { n: Math.round(s / 60) });
  return t("hours", { n: Math.round(s / 3600) });
}

export function fmtMiB(mib) {
  if (typeof mib !== "number") return "—";
  return mib >= 1024 ? t("gib", { n: (mib / 1024).toFixed(mib % 1024 ? 1 : 0) }) : t("mib", { n: mib });
}

/** Local time as 2026-11-22 06:54:05: the same in every language, no month/day confusion. */
export function fmtTime(at) {
  if (typeof at !== "number" || at < 1e9) return "—";
  const d = new Date(at * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export function percent(part, whole) {
  if (!whole) return "—";
  return `${Math.round((100 * part) / whole)} %`;
}

/** A labelled value, for the definition lists inside cards. */
export function field(label, ...value) {
  // <bdi>: numbers and Latin names keep their order inside a right-to-left page
  return [h("dt", {}, label), h("dd", {}, h("bdi", {}, ...value))];
}
