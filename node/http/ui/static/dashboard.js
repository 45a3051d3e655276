/* dicom-node dashboard: refreshes the page's live part and runs the action buttons. No framework. */
"use strict";

(function () {
  const REFRESH_MS = 5000;

  function flash(text, ok) {
    const box = document.getElementById("flash");
    if (!box) return;
    box.textContent = text;
    box.className = ok ? "ok" : "bad";
  }

  async function refresh() {
    const live = document.getElementById("live");
    if (!live || document.hidden) return;
    try {
      const r = await fetch(live.dataset.src, {headers: {Accept: "text/html"}, credentials: "same-origin"});
      if (r.redirected && new URL(r.url).pathname === "/login") {
        window.location.assign(r.url);
        return;
      }
      if (r.ok) {
        live.innerHTML = await r.text();
        live.dataset.refreshed = String(Date.now());
      }
    } catch (e) {
      flash("The node does not answer (" + e + ")", false);
    }
  }

  async function problemText(r) {
    try {
      const body = await r.json();
      return body.detail || body.code || r.statusText;
    } catch (e) {
      return r.statusText;
    }
  }

  async function act(button) {
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    button.disabled = true;
    try {
      const r = await fetch(button.dataset.url, {method: "POST", credentials: "same-origin",
                                                 headers: {Accept: "application/json"}});
      flash(r.ok ? button.textContent + ": done" : button.textContent + " refused: " + await problemText(r), r.ok);
    } catch (e) {
      flash(button.textContent + " failed: " + e, false);
    } finally {
      button.disabled = false;
    }
    await refresh();
  }

  document.addEventListener("click", function (ev) {
    const button = ev.target.closest("button.act");
    if (button) {
      ev.preventDefault();
      act(button);
    }
  });

  // ---- rule dry run -------------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function showValue(v) {
    if (v === null || v === undefined) return "(missing)";
    if (Array.isArray(v)) return v.join("\\");
    return String(v);
  }

  function renderReport(out, report) {
    out.replaceChildren();
    if (!report || !Array.isArray(report.series)) {
      out.append(el("pre", "", JSON.stringify(report, null, 2)));
      return;
    }
    const head = el("p", "", (report.source === "study" ? "Study #" + report.study_id + " (" + report.study_state + ")"
                                                        : "Files") + ": " + report.series.length + " series, "
                                                        + report.rules + " rule(s).");
    out.append(head);
    for (const note of report.notes || []) out.append(el("p", "note", note));
    const jobs = el("section", "planned");
    jobs.append(el("h2", "", "Jobs that would be created (" + report.jobs.length + ")"));
    if (report.jobs.length) {
      const t = el("table", "jobs");
      t.append(row("th", ["series", "model", "rule", "destinations", "notes"]));
      for (const j of report.jobs) {
        t.append(row("td", [j.series, j.model, j.rule, j.destinations.join(", "),
                            (j.awaits_prior ? "awaits a prior. " : "") + (j.notes || []).join(" ")]));
      }
      jobs.append(t);
    } else {
      jobs.append(el("p", "empty", "None: no rule matches."));
    }
    out.append(jobs);
    for (const s of report.series) {
      const sec = el("section", "series-check");
      const title = el("h2", "", "Series " + (s.label || s.key + " (" + s.instances + " instances)"));
      title.title = s.key;
      sec.append(title);
      const attrs = el("p", "attrs", Object.entries(s.attributes || {}).map(([k, v]) => k + "=" + showValue(v)).join("; "));
      sec.append(attrs);
      for (const n of s.notes || []) sec.append(el("p", "note", n));
      const list = el("ul", "rule-checks");
      for (const r of s.rules) {
        const li = el("li", r.matched ? "matched" : "unmatched");
        li.append(el("strong", "", (r.matched ? "\u2713 " : "\u2717 ") + r.rule));
        li.append(document.createTextNode(" -> " + r.models.join(", ") + " to " + r.send_to.join(", ")));
        const conds = el("ul", "conditions");
        for (const c of r.conditions) conds.append(el("li", c.held ? "held" : "failed", c.reason));
        li.append(conds);
        list.append(li);
      }
      sec.append(list);
      out.append(sec);
    }
    for (const f of report.skipped || []) out.append(el("p", "note", "skipped " + f.path + ": " + f.reason));
  }

  function row(cell, values) {
    const tr = el("tr");
    for (const v of values) tr.append(el(cell, "", v));
    return tr;
  }

  async function runRules(form) {
    const out = document.getElementById("rules-result");
    const file = document.getElementById("rules-file").files[0];
    const study = document.getElementById("rules-study").value;
    let init;
    if (file) {
      const body = new FormData();
      body.append("file", file);
      init = {method: "POST", body: body};
    } else if (study) {
      init = {method: "POST", body: JSON.stringify({study_id: Number(study)}),
              headers: {"Content-Type": "application/json"}};
    } else {
      flash("Choose a file or give a study number.", false);
      return;
    }
    init.credentials = "same-origin";
    init.headers = Object.assign({Accept: "application/json"}, init.headers || {});
    out.replaceChildren(el("p", "", "Testing..."));
    try {
      const r = await fetch("/api/v1/rules/test", init);
      if (!r.ok) {
        out.replaceChildren(el("p", "error", "Refused: " + await problemText(r)));
        return;
      }
      renderReport(out, await r.json());
    } catch (e) {
      out.replaceChildren(el("p", "error", "Failed: " + e));
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (document.getElementById("live")) {
      window.setInterval(refresh, REFRESH_MS);
      document.addEventListener("visibilitychange", refresh);
    }
    const form = document.getElementById("rules-test");
    if (form) {
      form.addEventListener("submit", function (ev) { ev.preventDefault(); runRules(form); });
      if (document.getElementById("rules-result").dataset.autorun) runRules(form);
    }
  });
})();
