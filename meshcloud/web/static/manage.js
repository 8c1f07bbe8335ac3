// Screens that change things: logging in, passwords, users, emergency codes, deploying.
import { h, t } from "./ui.js";

function formData(form) {
  return Object.fromEntries(new FormData(form).entries());
}

function errorLine() {
  return h("p", { class: "error", role: "alert", hidden: true });
}

function showError(el, message) {
  el.textContent = message;
  el.hidden = !message;
}

// -- login ----------------------------------------------------------------------------

export function loginView(ctx) {
  let emergency = false;
  const err = errorLine();
  const userFields = h("div", {},
    h("label", {}, t("user"), h("input", { name: "user", autocomplete: "username", required: true, autocapitalize: "none" })),
    h("label", {}, t("password"), h("input", { name: "password", type: "password", autocomplete: "current-password", required: true })));
  const codeFields = h("div", { hidden: true },
    h("label", {}, t("emergency_code"), h("input", { name: "code", autocomplete: "off", autocapitalize: "characters", placeholder: "ABCD-EFGH-JKMN" })),
    h("p", { class: "muted" }, t("emergency_help")));
  const toggle = h("button", { type: "button", class: "link", onclick: () => {
    emergency = !emergency;
    userFields.hidden = emergency;
    codeFields.hidden = !emergency;
    for (const i of userFields.querySelectorAll("input")) i.required = !emergency;
    codeFields.querySelector("input").required = emergency;
    toggle.textContent = emergency ? t("use_password") : t("use_code");
  } }, t("use_code"));
  const form = h("form", { class: "login", onsubmit: async (e) => {
    e.preventDefault();
    showError(err, "");
    const d = formData(form);
    const body = emergency ? { code: d.code } : { user: d.user, password: d.password };
    try {
      await ctx.login(body);
    } catch (ex) {
      showError(err, ex.message);
    }
  } },
    h("h1", {}, t("login_title")),
    h("p", { class: "muted" }, t("login_help")),
    userFields, codeFields, err,
    h("button", { type: "submit", class: "primary" }, t("login")),
    toggle);
  return h("section", { class: "view narrow" }, form);
}

// -- own password ---------------------------------------------------------------------

export function passwordView(state, ctx) {
  const err = errorLine();
  const forced = state.me && state.me.must_change_password;
  const form = h("form", { class: "stack", onsubmit: async (e) => {
    e.preventDefault();
    const d = formData(form);
    if (d.new_password !== d.again) return showError(err, t("passwords_differ"));
    const body = { new_password: d.new_password };
    if (!forced) body.current_password = d.current_password;
    try {
      state.me = await ctx.api("POST", "/api/v1/session/password", body);
      ctx.notice(t("password_changed"));
      location.hash = "#/overview";
      ctx.start();
    } catch (ex) {
      showError(err, ex.message);
    }
  } },
    h("h1", {}, t("change_password")),
    forced ? h("p", { class: "note" }, t("must_change")) : null,
    forced ? null : h("label", {}, t("current_password"), h("input", { name: "current_password", type: "password", autocomplete: "current-password", required: true })),
    h("label", {}, t("new_password"), h("input", { name: "new_password", type: "password", autocomplete: "new-password", minlength: 10, required: true })),
    h("label", {}, t("new_password_again"), h("input", { name: "again", type: "password", autocomplete: "new-password", minlength: 10, required: true })),
    err,
    h("button", { type: "submit", class: "primary" }, t("save")));
  return h("section", { class: "view narrow" }, form);
}

// -- users and emergency codes (admin) --------------------------------------------------

const ROLES = ["viewer", "operator", "admin"];

function roleSelect(value, attrs) {
  return h("select", attrs, ROLES.map((r) => h("option", { value: r, selected: r === value }, t(`role_${r}`))));
}

export function usersView(state, ctx) {
  const view = h("section", { class: "view" }, h("h1", {}, t("nav_users")), h("div", { class: "spinner" }));
  const err = errorLine();
  const load = async () => {
    let doc;
    try {
      doc = await ctx.api("GET", "/api/v1/users");
    } catch (ex) {
      showError(err, ex.message);
      view.replaceChildren(h("h1", {}, t("nav_users")), err);
      return;
    }
    const rows = doc.users.map((u) => h("li", { class: "card", "data-user": u.name },
      h("h2", {}, u.name),
      h("label", {}, t("role"), roleSelect(u.role, { onchange: (e) => save(u.name, { role: e.target.value }) })),
      u.must_change_password ? h("p", { class: "muted" }, t("must_change_pending")) : null,
      h("div", { class: "actions" },
        h("button", { onclick: () => {
          const pw = ctx.prompt(t("prompt_new_password", { user: u.name }));
          if (pw) save(u.name, { role: u.role, password: pw });
        } }, t("reset_password")),
        h("button", { class: "danger", onclick: () => ctx.confirm(t("confirm_delete_user", { user: u.name })) && del(u.name) }, t("delete")))));
    const add = h("form", { class: "inline", onsubmit: (e) => {
      e.preventDefault();
      const d = formData(add);
      save(d.name, { role: d.role, password: d.password });
    } },
      h("h2", {}, t("add_user")),
      h("label", {}, t("user"), h("input", { name: "name", required: true, pattern: "[a-z][a-z0-9-]{0,62}", autocapitalize: "none" })),
      h("label", {}, t("role"), roleSelect("viewer", { name: "role" })),
      h("label", {}, t("first_password"), h("input", { name: "password", type: "password", minlength: 10, required: true, autocomplete: "new-password" })),
      h("button", { type: "submit", class: "primary" }, t("add")));
    const codes = h("section", { class: "codes" },
      h("h2", {}, t("emergency_codes")),
      h("p", {}, t("codes_left", { unused: doc.emergency_codes.unused, total: doc.emergency_codes.total })),
      h("p", { class: "muted" }, t("codes_help")),
      h("button", { onclick: () => ctx.confirm(t("confirm_new_codes")) && newCodes() }, t("new_codes")));
    view.replaceChildren(h("h1", {}, t("nav_users")), err, h("ul", { class: "cards" }, rows), add, codes);
  };
  const save = async (name, body) => {
    try {
      await ctx.api("PUT", `/api/v1/users/${encodeURIComponent(name)}`, body);
      ctx.notice(t("user_saved", { user: name }));
      load();
    } catch (ex) {
      showError(err, ex.message);
    }
  };
  const del = async (name) => {
    try {
      await ctx.api("DELETE", `/api/v1/users/${encodeURIComponent(name)}`);
      load();
    } catch (ex) {
      showError(err, ex.message);
    }
  };
  const newCodes = async () => {
    try {
      const doc = await ctx.api("POST", "/api/v1/emergency-codes");
      view.replaceChildren(h("section", { class: "printable-codes" },
        h("h1", {}, t("emergency_codes")),
        h("p", {}, t("codes_print_now")),
        h("ol", { class: "code-list" }, doc.codes.map((c) => h("li", {}, h("code", {}, c)))),
        h("p", { class: "muted" }, t("codes_footer")),
        h("div", { class: "actions no-print" },
          h("button", { class: "primary", onclick: () => window.print() }, t("print")),
          h("button", { onclick: load }, t("done")))));
    } catch (ex) {
      showError(err, ex.message);
    }
  };
  load();
  return view;
}

// -- deploying an appliance (operator) ----------------------------------------------------

export function deployForm(ctx, spec) {
  const err = errorLine();
  const v = spec || { name: "", image: "demo", vcpus: 1, memory_mib: 256, priority: 500, replicas: 1 };
  const num = (name, value, min, max) => h("input", { name, type: "number", value, min, max, required: true, inputmode: "numeric" });
  const form = h("form", { class: "deploy", "data-testid": "deploy", onsubmit: async (e) => {
    e.preventDefault();
    const d = formData(form);
    const body = { ...(spec || {}), name: d.name, image: d.image, vcpus: +d.vcpus, memory_mib: +d.memory_mib, priority: +d.priority, replicas: +d.replicas };
    try {
      await ctx.api("PUT", `/api/v1/appliances/${encodeURIComponent(d.name)}`, body);
      ctx.notice(t("done_deploy", { app: d.name }));
      ctx.edit(null);
    } catch (ex) {
      showError(err, ex.message);
    }
  } },
    h("h2", {}, spec ? t("edit_app", { app: spec.name }) : t("deploy")),
    h("div", { class: "grid" },
      h("label", {}, t("name"), h("input", { name: "name", value: v.name, required: true, readonly: !!spec, pattern: "[a-z][a-z0-9-]{0,62}", autocapitalize: "none" })),
      h("label", {}, t("image"), h("input", { name: "image", value: v.image, required: true, autocapitalize: "none" })),
      h("label", {}, "vCPU", num("vcpus", v.vcpus, 1, 64)),
      h("label", {}, t("memory_mib"), num("memory_mib", v.memory_mib, 64, 524288)),
      h("label", {}, t("priority"), num("priority", v.priority, 0, 1000)),
      h("label", {}, t("replicas_wanted"), num("replicas", v.replicas, 0, 4))),
    err,
    h("div", { class: "actions" },
      h("button", { type: "submit", class: "primary" }, spec ? t("save") : t("deploy")),
      spec ? h("button", { type: "button", onclick: () => ctx.edit(null) }, t("cancel")) : null));
  return h("details", { class: "deploy-box", open: !!spec }, h("summary", {}, spec ? t("edit_app", { app: spec.name }) : t("deploy")), form);
}
