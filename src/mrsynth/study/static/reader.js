// mrsynth reader page: one trial at a time, answers by button or keyboard.
// Everything comes from this server; the page knows trials only by opaque ids.
(function () {
  "use strict";
  const token = decodeURIComponent(location.pathname.split("/")[2] || "");
  const api = (p) => "/api/r/" + encodeURIComponent(token) + "/" + p;
  const $ = (id) => document.getElementById(id);
  const SIX = ["Surely real", "Probably real", "Possibly real",
               "Possibly synthetic", "Probably synthetic", "Surely synthetic"];

  let state = null;       // last state from the server
  let phase = "loading";  // loading | instructions | answer | sending | feedback | done | error
  let t0 = 0;             // when the current image appeared (performance.now)
  let conf = null;        // optional confidence 1..5
  let exposureTimer = null;
  let pendingState = null;
  let built = false;

  // The phase is mirrored on <body data-phase> for styling and for automated tests.
  function setPhase(p) {
    phase = p;
    document.body.dataset.phase = p;
  }

  function show(id) {
    for (const s of ["loading", "instructions", "trial", "done", "error"]) $(s).hidden = s !== id;
  }

  function fail(message) {
    setPhase("error");
    $("error-text").textContent = message;
    show("error");
  }

  async function call(method, path, body) {
    let r;
    try {
      r = await fetch(api(path), {
        method: method,
        cache: "no-store",
        headers: body ? { "Content-Type": "application/json" } : {},
        body: body ? JSON.stringify(body) : undefined,
      });
    } catch (e) {
      throw new Error("The server cannot be reached. Check your connection and try again.");
    }
    if (!r.ok) {
      let detail = r.status + " " + r.statusText;
      try { const j = await r.json(); if (typeof j.detail === "string") detail = j.detail; } catch (e) { /* not JSON */ }
      throw new Error(detail);
    }
    return r.json();
  }

  function button(text, key, attrs, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "answer";
    b.textContent = text + " ";
    if (key) { const k = document.createElement("kbd"); k.textContent = key; b.appendChild(k); }
    for (const [a, v] of Object.entries(attrs)) b.setAttribute(a, v);
    b.addEventListener("click", onClick);
    return b;
  }

  function buildControls() {
    if (built) return;
    built = true;
    const c = $("controls");
    if (state.mode === "2afc") {
      document.body.classList.add("afc");
      c.appendChild(button("Left is real", "\u2190", { id: "answer-left", "data-choice": "0" }, () => answer({ choice: 0 })));
      c.appendChild(button("Right is real", "\u2192", { id: "answer-right", "data-choice": "1" }, () => answer({ choice: 1 })));
    } else if (state.scale === "six") {
      SIX.forEach((label, i) => {
        c.appendChild(button(label, String(i + 1), { id: "rating-" + (i + 1), "data-rating": String(i + 1) },
          () => answer({ rating: i + 1 })));
      });
    } else {
      c.appendChild(button("Real", "R", { id: "answer-real", "data-label": "real" }, () => answer({ label: "real" })));
      c.appendChild(button("Synthetic", "S", { id: "answer-synthetic", "data-label": "synthetic" }, () => answer({ label: "synthetic" })));
    }
    $("confidence").hidden = state.scale !== "confidence";
    for (const b of document.querySelectorAll("button.conf")) {
      b.addEventListener("click", () => setConf(Number(b.dataset.conf)));
    }
  }

  function setConf(v) {
    conf = conf === v ? null : v;
    for (const b of document.querySelectorAll("button.conf")) {
      b.classList.toggle("selected", Number(b.dataset.conf) === conf);
    }
  }

  function progress() {
    const p = $("progress");
    const ph = $("phase");
    if (!state.started) { p.textContent = ""; ph.hidden = true; return; }
    if (state.done) { p.textContent = state.total + " / " + state.total; ph.hidden = true; return; }
    if (state.trial && state.trial.practice) {
      ph.hidden = false;
      p.textContent = (state.practice_answered + 1) + " / " + state.practice_total;
    } else {
      ph.hidden = true;
      p.textContent = (state.answered + 1) + " / " + state.total;
    }
  }

  async function apply(s) {
    state = s;
    buildControls();
    progress();
    if (state.done) { setPhase("done"); show("done"); return; }
    if (!state.started) { setPhase("instructions"); show("instructions"); $("start").focus(); return; }
    await loadTrial(state.trial);
  }

  async function loadTrial(trial) {
    setPhase("loading");
    clearTimeout(exposureTimer);
    setConf(null);
    $("feedback").hidden = true;
    $("controls").hidden = false;
    $("confidence").hidden = state.scale !== "confidence";
    const imgs = trial.images.map((_, i) => $("img" + i));
    document.getElementById("images").style.visibility = "hidden";
    for (const m of document.querySelectorAll(".mask")) m.hidden = true;
    $("expired").hidden = true;
    let urls;
    try {
      // Fetched, not set as src, to tell "viewing time over" (410 after a reload) from errors.
      urls = await Promise.all(trial.images.map(fetchImage));
      await Promise.all(imgs.map((img, i) => {
        if (urls[i] === null) return null;
        if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
        img.src = urls[i];
        return img.decode();
      }));
    } catch (e) {
      fail("An image could not be loaded. Reload the page to continue.");
      return;
    }
    if (!state.trial || state.trial.id !== trial.id) return;  // superseded
    show("trial");
    document.getElementById("images").style.visibility = "visible";
    t0 = performance.now();
    if (urls.includes(null)) {
      // The page was reloaded after the image's viewing time: answer from memory.
      maskImages(imgs);
      $("expired").hidden = false;
      setPhase("answer");
      return;
    }
    for (const img of imgs) img.style.visibility = "visible";
    setPhase("answer");
    if (state.exposure_ms > 0) {
      exposureTimer = setTimeout(() => maskImages(imgs), state.exposure_ms);
    }
  }

  async function fetchImage(url) {
    const r = await fetch(url, { cache: "no-store" });
    if (r.status === 410) return null;
    if (!r.ok) throw new Error("image " + r.status);
    return URL.createObjectURL(await r.blob());
  }

  function maskImages(imgs) {
    for (const img of imgs) img.style.visibility = "hidden";
    for (const m of document.querySelectorAll(".slot .mask")) m.hidden = false;
  }

  function unmaskImages() {
    // Practice feedback explains the image: show it again (practice is not scored).
    if (!$("expired").hidden) return;  // refused by the server: nothing to show
    for (const m of document.querySelectorAll(".slot .mask")) m.hidden = true;
    for (const img of document.querySelectorAll(".slot img")) img.style.visibility = "visible";
    if (state.mode !== "2afc") $("img1").style.visibility = "hidden";
  }

  async function answer(fields) {
    if (phase !== "answer") return;
    setPhase("sending");
    clearTimeout(exposureTimer);
    const body = Object.assign({ trial: state.trial.id, response_ms: Math.round(performance.now() - t0) }, fields);
    if (state.scale === "confidence" && conf !== null) body.confidence = conf;
    let r;
    try {
      r = await call("POST", "answer", body);
    } catch (e) {
      fail(e.message);
      return;
    }
    if (r.feedback) {
      setPhase("feedback");
      const f = r.feedback;
      let text;
      if (state.mode === "2afc") {
        text = (f.correct ? "Correct: " : "Not quite: ") + "the " + (f.real_slot === 0 ? "left" : "right") + " image was real.";
      } else {
        text = (f.correct ? "Correct: " : "Not quite: ") + "this image was " + f.truth + ".";
      }
      $("feedback-text").textContent = text;
      $("controls").hidden = true;
      $("confidence").hidden = true;
      $("feedback").hidden = false;
      unmaskImages();
      $("continue").focus();
      pendingState = r.state;
      return;
    }
    await apply(r.state);
  }

  async function proceed() {
    if (phase !== "feedback") return;
    const s = pendingState;
    pendingState = null;
    await apply(s);
  }

  async function start() {
    if (phase !== "instructions") return;
    setPhase("loading");
    try { await apply(await call("POST", "start")); } catch (e) { fail(e.message); }
  }

  async function refresh() {
    setPhase("loading");
    show("loading");
    try { await apply(await call("GET", "state")); } catch (e) { fail(e.message); }
  }

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const k = e.key;
    if ((k === "Enter" || k === " ") && (phase === "instructions" || phase === "feedback")) {
      e.preventDefault();
      if (phase === "instructions") start(); else proceed();
      return;
    }
    if (phase !== "answer" || !state) return;
    if (state.mode === "2afc") {
      if (k === "ArrowLeft") { e.preventDefault(); answer({ choice: 0 }); return; }
      if (k === "ArrowRight") { e.preventDefault(); answer({ choice: 1 }); return; }
    } else if (state.scale === "six") {
      if (/^[1-6]$/.test(k)) { answer({ rating: Number(k) }); return; }
    } else {
      if (k === "r" || k === "R") { answer({ label: "real" }); return; }
      if (k === "s" || k === "S") { answer({ label: "synthetic" }); return; }
    }
    if (state.scale === "confidence" && /^[1-5]$/.test(k)) setConf(Number(k));
  });

  $("start").addEventListener("click", start);
  $("continue").addEventListener("click", proceed);
  $("retry").addEventListener("click", refresh);
  refresh();
})();
