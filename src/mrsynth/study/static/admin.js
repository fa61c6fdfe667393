// mrsynth admin page: results need the admin token, sent as a Bearer header.
// The token may be given in the URL fragment (#TOKEN), which never reaches the server log.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem("mrsynth-admin") || "";

  // A token in the fragment replaces the stored one, also when the admin page is already
  // open and the user pastes /admin#TOKEN into its address bar (hashchange, no reload).
  function tokenFromHash() {
    if (location.hash.length <= 1) return false;
    token = decodeURIComponent(location.hash.slice(1));
    history.replaceState(null, "", location.pathname);
    return true;
  }
  tokenFromHash();
  let csvUrl = null;
  let figUrl = null;

  const pct = (x) => (x === null || x === undefined ? "\u2013" : (100 * x).toFixed(1) + "%");
  const num = (x, d) => (x === null || x === undefined ? "\u2013" : Number(x).toFixed(d));
  const ci = (lo, hi) => (lo === null || lo === undefined ? "" : " [" + pct(lo) + ", " + pct(hi) + "]");

  async function get(path) {
    const r = await fetch(path, { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
    if (r.status === 401) throw new Error("Wrong admin token.");
    return r;
  }

  function table(el, head, rows) {
    el.replaceChildren();
    const tr = document.createElement("tr");
    for (const h of head) { const th = document.createElement("th"); th.textContent = h; tr.appendChild(th); }
    el.appendChild(tr);
    for (const r of rows) {
      const row = document.createElement("tr");
      for (const v of r) { const td = document.createElement("td"); td.textContent = v; row.appendChild(td); }
      el.appendChild(row);
    }
  }

  async function load() {
    let s;
    try {
      const r = await get("/api/admin/summary");
      if (!r.ok) throw new Error("Server error " + r.status);
      s = await r.json();
    } catch (e) {
      $("login-error").textContent = e.message;
      $("login-error").hidden = false;
      $("login").hidden = false;
      $("results").hidden = true;
      return;
    }
    sessionStorage.setItem("mrsynth-admin", token);
    $("login").hidden = true;
    $("results").hidden = false;
    const st = s.settings;
    $("settings").textContent = "Mode: " + st.mode + " \u00b7 scale: " + st.scale +
      " \u00b7 exposure: " + (st.exposure_ms ? st.exposure_ms + " ms" : "unlimited") +
      " \u00b7 contrasts: " + st.contrasts.join(", ") + " \u00b7 models: " + st.models.join(", ") +
      " \u00b7 " + s.n_answers + " scored answers";
    table($("readers"), ["Reader", "Answered", "Practice", "Started", "Finished", "Reloaded trials"],
      s.readers.map((r) => [r.name, r.answered + " / " + r.total, r.practice_answered + " / " + r.practice_total,
        r.started ? "yes" : "no", r.finished ? "yes" : "no", String(r.reloaded)]));
    table($("stats"), ["Reader", "Scope", "Model", "Contrast", "n", "Synthetic \u2192 real", "Real \u2192 synthetic",
      "Accuracy", "d\u2032", "AUC", "Median RT (s)"],
      s.rows.map((r) => [r.reader, r.scope, r.model, r.contrast, String(r.n),
        r.synthetic_as_real + "/" + r.n_synthetic + " " + pct(r.synthetic_as_real_frac) + ci(r.synthetic_as_real_ci_low, r.synthetic_as_real_ci_high),
        r.real_as_synthetic + "/" + r.n_real + " " + pct(r.real_as_synthetic_frac) + ci(r.real_as_synthetic_ci_low, r.real_as_synthetic_ci_high),
        pct(r.accuracy) + ci(r.accuracy_ci_low, r.accuracy_ci_high),
        num(r.dprime, 2), num(r.auc, 3), num(r.median_response_s, 2)]));
    const k = s.kappa;
    $("kappa").textContent = k.n_readers >= 2
      ? "Agreement between readers: Fleiss\u2019 \u03ba = " + num(k.kappa, 3) + " on " + k.n_items + " images answered by at least two of " + k.n_readers + " readers."
      : "Agreement between readers (Fleiss\u2019 \u03ba) needs at least two readers with answers.";
    const csv = await get("/api/admin/answers.csv");
    if (csvUrl) URL.revokeObjectURL(csvUrl);
    csvUrl = URL.createObjectURL(await csv.blob());
    $("csv").href = csvUrl;
    if (s.n_answers > 0) {
      const fig = await get("/api/admin/figure.png");
      if (fig.ok) {
        if (figUrl) URL.revokeObjectURL(figUrl);
        figUrl = URL.createObjectURL(await fig.blob());
        $("figure").src = figUrl;
        $("figure").hidden = false;
      }
    }
  }

  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token").value.trim();
    load();
  });
  $("refresh").addEventListener("click", load);
  window.addEventListener("hashchange", () => { if (tokenFromHash()) load(); });
  if (token) load();
})();
