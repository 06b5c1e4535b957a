/* The review screen. Statistics and overlays are recomputed in the browser from flat score arrays
   on every slider movement (no round trip); images stream in by page as the grid scrolls; edits
   are stored as reviews through the API and never touch the raw predictions.

   One source of truth for the thresholds in force: state.global and state.classT (per class, used
   when state.perClass). Every slider, the statistics, the histogram's lines, the precision/recall
   markers, the overlays, the filters and the URL read them from there. */
"use strict";
(() => {
  const {api, h, fail, toast, colorOf, drawInstances, confirmDialog} = Distill;
  const root = document.getElementById("review");
  const RUN = +root.dataset.run, PID = +root.dataset.project;
  const TILE = 180, GAP = 8, PAGE = 200;
  const $ = (id) => document.getElementById(id);
  // slider -> redraw timings, read by benchmarks/review_ui.py
  const timings = (window.__distillTimings = []);
  const breakdown = (window.__distillBreakdown = []);

  const state = {
    run: null, project: null, cats: [], global: 0.5, perClass: false, classT: {},
    S: null, C: null, I: null, nImages: 0, val: null, labeledPerImage: null,
    items: [], total: 0, loading: new Set(),
    // filters (kept in the URL with the thresholds)
    order: "agreement", category: "", review: "", smin: "", smax: "", kmin: "", kmax: "", agree: "", dclass: "",
  };
  let hist = null, pr = null;

  // thresholds live on the sliders' 0.001 grid, so what a slider shows is what is in force
  const snap = (t) => Math.round(t * 1000) / 1000;
  const thresholdOf = (cat) => (state.perClass && state.classT[cat] !== undefined ? state.classT[cat] : state.global);
  const uniform = () => !state.perClass || state.cats.every((c) => thresholdOf(c.id) === state.global);

  /* ---- statistics, computed here from typed arrays ---- */
  let stamp = 0, seen = null;
  function computeStats() {
    const {S, C, I} = state;
    if (!seen || seen.length < state.nImages) seen = new Uint32Array(Math.max(1, state.nImages));
    stamp++;
    let kept = 0, withAny = 0;
    const perCat = {};
    for (let i = 0; i < S.length; i++) {
      const c = C[i];
      if (S[i] >= thresholdOf(c)) {
        kept++; perCat[c] = (perCat[c] || 0) + 1;
        if (seen[I[i]] !== stamp) { seen[I[i]] = stamp; withAny++; }
      }
    }
    const out = {kept, withAny, perImage: state.nImages ? kept / state.nImages : 0, perCat};
    if (state.val && state.val.ground_truth) {
      const v = state.val; let k = 0, tp = 0;
      for (let i = 0; i < v.scores.length; i++) if (v.scores[i] >= thresholdOf(v.categories[i])) { k++; tp += v.tp[i]; }
      out.precision = k ? tp / k : 1; out.recall = tp / v.ground_truth;
    }
    return out;
  }

  function renderStats(s) {
    $("stat-images-with").textContent = s.withAny.toLocaleString();
    $("stat-images").textContent = state.nImages.toLocaleString();
    $("stat-per-image").textContent = s.perImage.toFixed(2);
    $("stat-labeled").textContent = state.labeledPerImage == null ? "n/a" : state.labeledPerImage.toFixed(2);
    $("stat-kept").textContent = s.kept.toLocaleString();
    $("stat-precision").textContent = s.precision == null ? "n/a" : (s.precision * 100).toFixed(1) + "%";
    $("stat-recall").textContent = s.recall == null ? "n/a" : (s.recall * 100).toFixed(1) + "%";
    const pairs = state.nImages ? `${s.withAny} images, ${s.kept} pseudo-labels` : "";
    $("launch-summary").textContent = `The student will train on the labeled set plus ${pairs} (at the current thresholds, reviews applied: rejected images dropped, edited ones as edited).`;
    drawMarkers(s);
  }

  /* The threshold lines and the current precision/recall live on canvases laid over the charts,
     so a slider movement repaints two thin overlays instead of re-rendering the charts. With one
     threshold for all classes: one red line, and the precision/recall dots on their curves at it.
     With per-class thresholds: one line per class in its colour, and precision/recall (which no
     single-threshold curve holds) as levels across the chart. What was drawn: __distillMarkers. */
  function overlayFor(chart) {
    const c = chart.canvas, o = h("canvas", {class: "chart-overlay", width: c.width, height: c.height,
      style: `position:absolute;left:0;top:0;width:${c.style.width};height:${c.style.height};pointer-events:none`});
    c.parentNode.append(o);
    return o;
  }
  let histOverlay = null, prOverlay = null;
  const markers = (window.__distillMarkers = {hist: [], pr: null});
  function drawMarkers(s) {
    const dpr = window.devicePixelRatio || 1;
    const one = uniform();
    if (hist) {
      histOverlay = histOverlay || overlayFor(hist);
      const ctx = histOverlay.getContext("2d"), x = hist.scales.x, y = hist.scales.y;
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, histOverlay.width, histOverlay.height);
      const lines = one ? [{t: state.global, color: "#d00"}] : state.cats.map((c) => ({cat: c.id, t: thresholdOf(c.id), color: colorOf(state.cats, c.id)}));
      ctx.lineWidth = 2;
      for (const l of lines) {
        const px = x.left + (x.right - x.left) * l.t;
        ctx.strokeStyle = l.color; ctx.beginPath(); ctx.moveTo(px, y.top); ctx.lineTo(px, y.bottom); ctx.stroke();
      }
      markers.hist = lines.map(({cat, t}) => ({cat, t}));
    }
    if (pr && s.precision != null) {
      prOverlay = prOverlay || overlayFor(pr);
      const ctx = prOverlay.getContext("2d"), x = pr.scales.x, y = pr.scales.y;
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, prOverlay.width, prOverlay.height);
      ctx.fillStyle = ctx.strokeStyle = "#d00";
      if (one) {
        for (const v of [s.precision, s.recall]) {
          ctx.beginPath(); ctx.arc(x.getPixelForValue(state.global), y.getPixelForValue(v * 100), 4, 0, 2 * Math.PI); ctx.fill();
        }
        markers.pr = {mode: "dots", x: state.global, precision: s.precision, recall: s.recall};
      } else {
        ctx.setLineDash([5, 3]); ctx.lineWidth = 1.5;
        for (const v of [s.precision, s.recall]) {
          const py = y.getPixelForValue(v * 100);
          ctx.beginPath(); ctx.moveTo(x.left, py); ctx.lineTo(x.right, py); ctx.stroke();
        }
        ctx.setLineDash([]);
        ctx.font = "11px system-ui"; ctx.fillText("per-class thresholds", x.left + 4, y.top + 12);
        markers.pr = {mode: "levels", precision: s.precision, recall: s.recall};
      }
    }
  }

  /* The automatic threshold, a dashed line drawn with the histogram (it does not move). */
  const thresholdLine = {
    id: "thresholdLine",
    afterDatasetsDraw(chart, args, opts) {
      const x = chart.scales.x, y = chart.scales.y, ctx = chart.ctx;
      ctx.save();
      if (opts.auto != null) {
        const pa = x.left + (x.right - x.left) * opts.auto;
        ctx.strokeStyle = "#090"; ctx.setLineDash([4, 3]); ctx.beginPath(); ctx.moveTo(pa, y.top); ctx.lineTo(pa, y.bottom); ctx.stroke();
      }
      ctx.restore();
    },
  };

  function buildCharts(summary) {
    const edges = summary.histograms.edges;
    const labels = edges.slice(0, -1).map((e) => e.toFixed(2));
    const datasets = state.cats.map((c) => ({label: c.name, data: summary.histograms[String(c.id)] || labels.map(() => 0),
      backgroundColor: colorOf(state.cats, c.id), stack: "s"}));
    hist = new Chart($("hist"), {type: "bar", data: {labels, datasets}, plugins: [thresholdLine],
      options: {animation: false, responsive: true, maintainAspectRatio: false,
        plugins: {thresholdLine: {auto: state.run.auto_threshold}, legend: {labels: {boxWidth: 10}},
          title: {display: true, text: "ensembled scores (lines: thresholds, green: automatic)"}},
        scales: {x: {stacked: true, ticks: {maxTicksLimit: 6}}, y: {stacked: true}}}});
    const v = summary.validation;
    if (v) {
      pr = new Chart($("pr"), {type: "line", data: {datasets: [
        {label: "precision", data: v.thresholds.map((t, i) => ({x: t, y: v.precision[i] * 100})), borderColor: "#4363d8", pointRadius: 0},
        {label: "recall", data: v.thresholds.map((t, i) => ({x: t, y: v.recall[i] * 100})), borderColor: "#f58231", pointRadius: 0}]},
        options: {animation: false, responsive: true, maintainAspectRatio: false, parsing: false,
          plugins: {title: {display: true, text: `validation (${v.images} images, IoU 0.5)`}, legend: {labels: {boxWidth: 10}}},
          scales: {x: {type: "linear", min: 0, max: 1, title: {display: true, text: "threshold"}}, y: {min: 0, max: 100}}}});
      if (v.ap) viewApTable(v.ap, v.images);
    } else {
      $("pr").replaceWith(h("p", {class: "muted"}, "Add a validation set to the inference run to see precision and recall here."));
    }
  }

  // COCO AP on the validation images: the ensemble against every single view alone
  function viewApTable(ap, images) {
    const kinds = Object.keys(ap), names = Object.keys(ap[kinds[0]]);
    const best = Math.max(...names.filter((n) => n !== "ensembled").map((n) => ap[kinds[kinds.length - 1]][n].AP));
    const cols = kinds.flatMap((k) => [[k, "AP"], [k, "AP50"]]);
    const head = h("tr", {}, h("th", {}, "predictions"), ...cols.map(([k, m]) => h("th", {}, `${k === "bbox" ? "box" : "keypoint"} ${m}`)));
    const rows = names.map((n) => h("tr", {class: n === "ensembled" ? "ensembled" : ""},
      h("td", {}, n === "ensembled" ? "ensembled" : `view ${n}`),
      ...cols.map(([k, m]) => h("td", {}, ap[k][n][m] < 0 ? "–" : ap[k][n][m].toFixed(1)))));
    const sec = $("view-ap");
    const gain = ap[kinds[kinds.length - 1]].ensembled.AP - best;
    sec.append(h("h3", {}, `COCO AP on validation (${images} images)`),
      h("p", {class: "muted small"}, `ensembling ${gain >= 0 ? "adds" : "loses"} ${Math.abs(gain).toFixed(1)} AP over the best single view`),
      h("table", {class: "list small", id: "view-ap-table"}, h("thead", {}, head), h("tbody", {}, ...rows)));
    sec.hidden = false;
  }

  /* ---- the URL keeps the filters and the thresholds, so a view can be shared and reloaded ---- */
  const FILTERS = ["order", "category", "review", "smin", "smax", "kmin", "kmax", "agree", "dclass"];
  function saveUrl() {
    const q = new URLSearchParams();
    q.set("t", state.global.toFixed(3));
    if (state.perClass) q.set("pc", state.cats.map((c) => `${c.id}:${thresholdOf(c.id).toFixed(3)}`).join(","));
    for (const k of FILTERS) if (state[k] !== "" && !(k === "order" && state[k] === "agreement")) q.set(k, state[k]);
    history.replaceState(null, "", `${location.pathname}?${q}${location.hash}`);
  }
  function readUrl() {
    const q = new URLSearchParams(location.search);
    const t = parseFloat(q.get("t"));
    if (Number.isFinite(t) && t >= 0 && t <= 1) state.global = snap(t);
    for (const c of state.cats) state.classT[c.id] = state.global;
    if (q.get("pc")) {
      state.perClass = true;
      for (const part of q.get("pc").split(",")) {
        const [id, v] = part.split(":"), x = parseFloat(v);
        if (state.classT[id] !== undefined && Number.isFinite(x) && x >= 0 && x <= 1) state.classT[id] = snap(x);
      }
    }
    for (const k of FILTERS) if (q.get(k) != null) state[k] = q.get(k);
  }
  function showFilters() {
    $("ordering").value = state.order; $("filter-category").value = state.category; $("filter-review").value = state.review;
    $("filter-smin").value = state.smin; $("filter-smax").value = state.smax; $("filter-kmin").value = state.kmin;
    $("filter-kmax").value = state.kmax; $("filter-agree").value = state.agree;
    $("filter-disagree").value = state.dclass;
    showDisagree();
  }

  /* Per-class disagreement. Agreement is stored per image (over all its classes), so the filter
     is what the data allows, and says so: images with a kept pseudo-label of the chosen class
     whose agreement is at most the Agreement bound (DISAGREE_AT when that is empty). */
  const DISAGREE_AT = 0.5;
  const activeCategory = () => state.dclass || state.category;
  const agreeBound = () => (state.agree !== "" ? state.agree : state.dclass ? String(DISAGREE_AT) : "");
  function showDisagree() {
    const c = state.cats.find((x) => String(x.id) === String(state.dclass));
    if (state.dclass && !c) state.dclass = "";  // a class the project lacks (an old URL)
    $("filter-category").disabled = !!c;
    $("filter-category").value = c ? String(c.id) : state.category;
    const note = $("disagree-note");
    note.hidden = !c;
    if (c) note.textContent = `Per-class disagreement on “${c.name}”: images with a kept ${c.name} pseudo-label whose views disagree with ` +
      `the ensemble (image agreement ≤ ${(+agreeBound()).toFixed(2)}${state.agree === "" ? ", the default; set Agreement ≤ to change it" : ""}). ` +
      "Agreement is measured per image, over all of its classes, not for this class alone.";
  }

  /* ---- grid: virtual scrolling over all images, pages fetched on demand ---- */
  const grid = $("grid"), inner = $("grid-inner");
  const tiles = new Map();  // index -> element
  // filters that depend on the thresholds in force are asked of the server again when they change
  const thresholdFiltered = () => !!(activeCategory() || state.kmin !== "" || state.kmax !== "");

  function query(page) {
    const q = new URLSearchParams({page, page_size: PAGE, ordering: state.order, views: "false", compact: "1"});
    const cat = activeCategory();
    if (cat) {
      q.set("category", cat);
      q.set("min_score", state.smin !== "" ? Math.max(+state.smin, thresholdOf(+cat)) : thresholdOf(+cat));
    } else if (state.smin !== "") q.set("min_score", state.smin);
    if (state.smax !== "") q.set("max_score", state.smax);
    if (state.review) q.set("review", state.review);
    if (agreeBound() !== "") q.set("max_agreement", agreeBound());
    if (state.kmin !== "" || state.kmax !== "") {
      q.set("thresholds", JSON.stringify(currentThresholds()));
      if (state.kmin !== "") q.set("kept_min", state.kmin);
      if (state.kmax !== "") q.set("kept_max", state.kmax);
    }
    return `/api/inference-runs/${RUN}/predictions/?${q}`;
  }

  // compact rows: [x, y, w, h, score, category_id, keypoints?, keypoint_scores?] -> the objects the drawing code takes
  const expand = (list) => list.map((d) => (Array.isArray(d)
    ? {bbox: [d[0], d[1], d[2], d[3]], score: d[4], category_id: d[5], ...(d[6] ? {keypoints: d[6]} : {}),
       ...(d[7] ? {keypoint_scores: d[7]} : {})} : d));
  function expandRow(r) {
    r.ensembled = expand(r.ensembled);
    r.url = r.url || `/api/images/${r.image}/file/`;
    r.thumbnail_url = r.thumbnail_url || `/api/images/${r.image}/thumbnail/`;
    return r;
  }

  async function loadPage(page) {
    if (state.loading.has(page)) return;
    state.loading.add(page);
    const gen = state.gen;
    try {
      const d = await api(query(page));
      if (gen !== state.gen) return;
      state.total = d.count;
      d.results.forEach((r, k) => (state.items[(page - 1) * PAGE + k] = expandRow(r)));
      layout();
    } catch (e) { fail(e); }
  }

  function columns() { return Math.max(1, Math.floor((grid.clientWidth - GAP) / (TILE + GAP))); }

  const layoutTimes = (window.__distillLayoutTimes = []);
  function layout() {
    const t0 = performance.now();
    layoutInner();
    layoutTimes.push(performance.now() - t0);
  }

  function layoutInner() {
    const cols = columns();
    const rows = Math.ceil(state.total / cols);
    inner.style.height = rows * (TILE + GAP) + "px";
    $("grid-count").textContent = `${state.total.toLocaleString()} images`;
    const first = Math.max(0, Math.floor(grid.scrollTop / (TILE + GAP)) - 1);
    const last = Math.min(rows, Math.ceil((grid.scrollTop + grid.clientHeight) / (TILE + GAP)) + 1);
    const want = new Set();
    for (let r = first; r < last; r++) for (let c = 0; c < cols; c++) {
      const i = r * cols + c;
      if (i >= state.total) break;
      want.add(i);
      if (!state.items[i]) { loadPage(Math.floor(i / PAGE) + 1); continue; }
      let t = tiles.get(i);
      if (!t || t._item !== state.items[i]) { if (t) t.remove(); t = makeTile(i, state.items[i]); tiles.set(i, t); inner.append(t); }
      t.style.transform = `translate(${GAP + c * (TILE + GAP)}px, ${GAP + r * (TILE + GAP)}px)`;
    }
    for (const [i, t] of tiles) if (!want.has(i)) { t.remove(); tiles.delete(i); }
  }

  function makeTile(i, item) {
    const s = (TILE - 24) / Math.max(item.width, item.height);
    const w = Math.round(item.width * s), hgt = Math.round(item.height * s);
    const canvas = h("canvas", {width: w, height: hgt, class: "overlay"});
    const img = h("img", {src: item.thumbnail_url, width: w, height: hgt, alt: "", loading: "lazy", decoding: "async"});
    const t = h("div", {class: "tile", "data-image": item.image, tabindex: -1, onclick: () => openDetail(i)},
      h("div", {class: "pic", style: `width:${w}px;height:${hgt}px`}, img, canvas),
      h("div", {class: "cap"}, h("span", {class: "name", title: item.file_name}, item.file_name),
        h("span", {class: "agree", title: "agreement between views"}, item.agreement.toFixed(2))));
    t._item = item; t._canvas = canvas; t._s = s;
    drawTile(t);
    return t;
  }

  function tileInstances(item) {
    const r = item.review;
    if (r && r.state === "edited") return {list: r.instances, edited: true};
    if (r && r.state === "rejected") return {list: [], rejected: true};
    const cut = keypointCut();
    if (cut === null) return {list: item.ensembled};
    // the keypoints the student form's keypoint threshold leaves unlabeled: drawn hollow
    return {list: item.ensembled.map((d) => (d.keypoints && d.keypoint_scores ? {...d, keypoints: d.keypoints.map((v, n) =>
      (n % 3 === 2 && d.keypoint_scores[(n - 2) / 3] < cut ? 0 : v))} : d)), hollow: true};
  }

  /* Keypoint projects: which keypoints a pseudo-label set would leave out. "auto" is the threshold
     the server computes over every kept instance's keypoint scores at the thresholds in force
     (threshold-stats' keypoint_threshold_auto), asked for once the slider settles. */
  function keypointCut() {
    if (state.project.task !== "keypoints" || $("kp-threshold").value === "none") return null;
    return state.kpAuto ?? null;
  }
  let kpAsked = 0, kpPending = false;
  async function refreshKeypointCut() {
    kpPending = false;
    if (state.project.task !== "keypoints") return;
    const seq = ++kpAsked;
    const q = new URLSearchParams({thresholds: JSON.stringify(currentThresholds())});
    const st = await api(`/api/inference-runs/${RUN}/threshold-stats/?${q}`).catch(fail);
    if (!st || seq !== kpAsked) return;
    const c = st.current;
    state.kpAuto = c.keypoint_threshold_auto ?? null;
    $("kp-note").textContent = c.keypoint_threshold_auto == null ? "" : $("kp-threshold").value === "none"
      ? "every keypoint of the kept instances is taught"
      : `${c.keypoints_hidden_auto} of ${c.keypoints_kept} keypoints left out (score below ${c.keypoint_threshold_auto.toFixed(2)}), drawn hollow on the tiles`;
    root.dataset.kpCut = state.kpAuto ?? "";
    redrawTiles();
  }

  // with a class filter, tiles draw that class alone
  const shownOnTile = (cat) => !activeCategory() || cat === +activeCategory();
  function drawTile(t) {
    const item = t._item, ctx = t._canvas.getContext("2d");
    ctx.clearRect(0, 0, t._canvas.width, t._canvas.height);
    const {list, edited, rejected, hollow} = tileInstances(item);
    const th = edited ? (c) => (shownOnTile(c) ? 0 : Infinity) : (c) => (shownOnTile(c) ? thresholdOf(c) : Infinity);
    const n = drawInstances(ctx, edited ? list.map((d) => ({...d, score: d.score ?? 1})) : list, state.cats, t._s,
      {threshold: th, lineWidth: 1.5, unplaced: !!hollow});
    t.dataset.drawn = n;
    t.classList.toggle("rejected", !!rejected);
    t.classList.toggle("accepted", !!(item.review && item.review.state === "accepted"));
    t.classList.toggle("edited", !!edited);
  }

  function redrawTiles() { for (const t of tiles.values()) drawTile(t); }

  let refilter = null;  // a pending re-query after a threshold change
  function resetGrid() {
    clearTimeout(refilter);  // this query already has the thresholds in force
    if (kpPending) refreshKeypointCut();
    state.gen = (state.gen || 0) + 1;
    state.items = []; state.total = 0; state.loading.clear();
    for (const t of tiles.values()) t.remove();
    tiles.clear(); grid.scrollTop = 0;
    saveUrl();
    loadPage(1);
  }

  /* ---- thresholds ---- */
  /* Redraw synchronously in the input handler: the statistics over every score and the visible
     overlays take a few milliseconds, and Chromium delivers slider input at most once a frame. */
  function onThresholdChange() {
    const t0 = performance.now();
    const st = computeStats();
    const b = performance.now();
    renderStats(st);
    const c = performance.now();
    redrawTiles();
    $("threshold-value").textContent = state.global.toFixed(3);
    const d = performance.now();
    timings.push(d - t0);
    breakdown.push({stats: b - t0, panel: c - b, tiles: d - c});
    root.dataset.updates = String(timings.length);
    clearTimeout(refilter);
    kpPending = state.project.task === "keypoints";
    refilter = setTimeout(() => { if (thresholdFiltered()) resetGrid(); else { saveUrl(); refreshKeypointCut(); } }, 300);
  }

  const classInputs = {};
  function showThresholds() {
    $("threshold").value = state.global; $("threshold-value").textContent = state.global.toFixed(3);
    $("per-class").checked = state.perClass; $("class-sliders").hidden = !state.perClass;
    for (const c of state.cats) {
      const {input, out} = classInputs[c.id];
      input.value = state.classT[c.id]; out.textContent = state.classT[c.id].toFixed(3);
    }
  }

  $("threshold").addEventListener("input", (e) => {
    state.global = +e.target.value;
    // in per-class mode the global slider moves every class with it
    if (state.perClass) for (const c of state.cats) { state.classT[c.id] = state.global; classInputs[c.id].input.value = state.global; classInputs[c.id].out.textContent = state.global.toFixed(3); }
    onThresholdChange();
  });
  $("use-auto").addEventListener("click", () => {
    if (state.run.auto_threshold == null) return toast("no automatic threshold: the project has no labeled set", "error");
    state.global = snap(state.run.auto_threshold);
    for (const c of state.cats) state.classT[c.id] = state.global;
    showThresholds(); onThresholdChange();
  });
  $("per-class").addEventListener("change", (e) => {
    // per-class thresholds start where the global one is now
    state.perClass = e.target.checked;
    for (const c of state.cats) state.classT[c.id] = state.global;
    showThresholds(); onThresholdChange();
  });

  function buildClassSliders() {
    $("class-sliders").replaceChildren(...state.cats.map((c) => {
      const out = h("output", {}, state.global.toFixed(3));
      const input = h("input", {type: "range", min: 0, max: 1, step: 0.001, value: state.global, "aria-label": `threshold for ${c.name}`,
        "data-category": c.id,
        oninput: (e) => { state.classT[c.id] = +e.target.value; out.textContent = (+e.target.value).toFixed(3); onThresholdChange(); }});
      classInputs[c.id] = {input, out};
      return h("div", {class: "slider-row"}, h("span", {class: "swatch", style: `background:${colorOf(state.cats, c.id)}`}), h("span", {class: "cname"}, c.name), input, out);
    }));
    $("filter-category").append(...state.cats.map((c) => h("option", {value: c.id}, c.name)));
    $("filter-disagree").append(...state.cats.map((c) => h("option", {value: c.id}, c.name)));
    // the legend of the per-view colours in the detail view
  }

  function currentThresholds() {
    const t = {default: state.global};
    if (state.perClass) for (const c of state.cats) t[c.id] = thresholdOf(c.id);
    return t;
  }

  /* ---- detail: compare views, edit, review ---- */
  const dlg = $("detail"), editor = $("editor");
  const VIEW_COLORS = ["#ff0", "#0ff", "#f0f", "#fff", "#fa0", "#0fa", "#a0f", "#aaa"];
  const D = {index: -1, item: null, views: null, instances: [], candidates: [], selected: -1, undo: [], mode: null, drag: null,
    scale: 1, zoom: 1, panX: 0, panY: 0, img: null, dirty: false};
  const draftKey = (imageId) => `distill-draft-${RUN}-${imageId}`;
  window.__distillEditor = D;  // read by the browser tests

  function setDirty(v) {
    D.dirty = v;
    $("detail-unsaved").hidden = !v;
    dlg.dataset.dirty = v ? "1" : "";
  }

  let openSeq = 0;
  async function openDetail(i) {
    const item = state.items[i];
    if (!item) return;
    // a navigation (the dialog already open) that the user closed, or overtook, while its image
    // loaded must not open the dialog again or show a stale image
    const seq = ++openSeq, navigating = dlg.open;
    const full = await api(`/api/inference-runs/${RUN}/predictions/?image=${item.image}&views=true`).catch(fail);
    if (!full || seq !== openSeq || (navigating && !dlg.open)) return;
    D.index = i; D.item = item; D.selected = -1; D.undo = []; D.mode = null; D.zoom = 1; D.panX = D.panY = 0;
    const rec = full.results[0];
    Object.assign(item, {review: rec.review});
    D.views = rec.views || {};
    loadInstances();
    $("detail-title").textContent = `${item.file_name} (${i + 1}/${state.total})`;
    $("detail-agreement").textContent = `agreement ${item.agreement.toFixed(2)}`;
    showReviewBadge();
    $("view-legend").replaceChildren(...Object.keys(D.views).map((v, k) =>
      h("span", {class: "legend-item"}, h("span", {class: "swatch", style: `background:${VIEW_COLORS[k % 8]}`}), v)));
    $("btn-prev").disabled = i <= 0; $("btn-next").disabled = i >= state.total - 1;
    D.img = new Image();
    D.img.onload = () => { sizeEditor(); drawEditor(); renderViews(); };
    D.img.src = item.url;
    $("box-class").replaceChildren(...state.cats.map((c, k) => h("option", {value: c.id}, `${k < 9 ? k + 1 + " " : ""}${c.name}`)));
    if (!dlg.open) dlg.showModal();
    // the keyboard loop (open -> a/r -> next) works from the first key: focus on the image, not a control
    editor.focus({preventScroll: true});
  }

  function showReviewBadge() {
    const r = D.item.review;
    $("detail-review").textContent = r ? (r.state === "edited" ? "edited (saved)" : r.state) : "not reviewed";
    $("detail-review").className = "badge " + (r ? r.state : "");
  }

  // what the editor starts from: the saved edit, or the kept ensembled instances; the rest are
  // candidates (drawn faint) that can be accepted one by one
  function loadInstances() {
    const item = D.item;
    const {list, edited} = tileInstances(item);
    const above = (d) => d.score >= thresholdOf(d.category_id);
    D.instances = JSON.parse(JSON.stringify(edited ? list : list.filter(above)));
    D.candidates = edited ? [] : JSON.parse(JSON.stringify(item.ensembled.filter((d) => !above(d))));
    D.selected = -1; D.undo = [];
    const draft = localStorage.getItem(draftKey(item.image));
    $("draft-note").textContent = "";
    setDirty(false);
    if (draft) {
      D.instances = JSON.parse(draft); setDirty(true);
      $("draft-note").textContent = "Unsaved edits restored from this browser — save (s) to keep them.";
    }
  }

  function sizeEditor() {
    const maxW = Math.min(720, window.innerWidth * 0.55), maxH = window.innerHeight - 190;
    D.scale = Math.min(maxW / D.item.width, maxH / D.item.height);
    editor.width = Math.round(D.item.width * D.scale); editor.height = Math.round(D.item.height * D.scale);
  }

  /* Zoom and pan: the view is image -> canvas: x * scale * zoom + pan. */
  const k = () => D.scale * D.zoom;
  const toImage = (px, py) => [(px - D.panX) / k(), (py - D.panY) / k()];
  function clampPan() {
    const w = editor.width * D.zoom, hh = editor.height * D.zoom;
    D.panX = Math.min(0, Math.max(editor.width - w, D.panX)); D.panY = Math.min(0, Math.max(editor.height - hh, D.panY));
  }
  function zoomAt(f, px = editor.width / 2, py = editor.height / 2) {
    const z = Math.min(16, Math.max(1, D.zoom * f));
    const [ix, iy] = toImage(px, py);
    D.zoom = z; D.panX = px - ix * k(); D.panY = py - iy * k(); clampPan(); drawEditor();
  }
  function fit() { D.zoom = 1; D.panX = D.panY = 0; drawEditor(); }

  function drawEditor() {
    const ctx = editor.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#222"; ctx.fillRect(0, 0, editor.width, editor.height);
    ctx.drawImage(D.img, D.panX, D.panY, editor.width * D.zoom, editor.height * D.zoom);
    ctx.translate(D.panX, D.panY);
    if ($("overlay-views").checked) {
      Object.keys(D.views).forEach((v, n) => drawInstances(ctx, D.views[v], state.cats, k(),
        {threshold: thresholdOf, lineWidth: 1, dashed: true, color: VIEW_COLORS[n % 8]}));
    }
    ctx.globalAlpha = 0.55;
    drawInstances(ctx, D.candidates, state.cats, k(), {lineWidth: 1, dashed: true, selected: D.selected < -1 ? -D.selected - 2 : -1});
    ctx.globalAlpha = 1;
    drawInstances(ctx, D.instances, state.cats, k(), {lineWidth: 2, selected: D.selected, unplaced: true});
    // class and score beside each box
    ctx.font = "11px system-ui"; ctx.textBaseline = "bottom";
    D.instances.forEach((d) => {
      const c = state.cats.find((x) => x.id === d.category_id);
      const label = `${c ? c.name : d.category_id}${d.score != null && d.score < 1 ? " " + d.score.toFixed(2) : ""}`;
      const x = d.bbox[0] * k(), y = d.bbox[1] * k(), w = ctx.measureText(label).width + 4;
      ctx.fillStyle = colorOf(state.cats, d.category_id); ctx.fillRect(x, y - 13, w, 13);
      ctx.fillStyle = "#fff"; ctx.fillText(label, x + 2, y);
    });
    if (D.selected >= 0) {
      const [x, y, w, hh] = D.instances[D.selected].bbox;
      ctx.fillStyle = "#fff"; ctx.fillRect((x + w) * k() - 4, (y + hh) * k() - 4, 8, 8);
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    editor.dataset.image = D.item.image;
    editor.dataset.instances = D.instances.length;
    editor.dataset.candidates = D.candidates.length;
    editor.dataset.zoom = D.zoom.toFixed(3);
    editor.dataset.pan = `${Math.round(D.panX)},${Math.round(D.panY)}`;
    $("zoom-value").textContent = `${Math.round(D.zoom * 100)}%`;
  }

  function renderViews() {
    const panels = [["ensembled", D.item.ensembled], ...Object.entries(D.views)];
    $("views").replaceChildren(...panels.map(([name, list], n) => {
      const s = 150 / Math.max(D.item.width, D.item.height);
      const c = h("canvas", {width: Math.round(D.item.width * s), height: Math.round(D.item.height * s)});
      const ctx = c.getContext("2d");
      ctx.drawImage(D.img, 0, 0, c.width, c.height);
      const cnt = drawInstances(ctx, list, state.cats, s, {threshold: thresholdOf, lineWidth: 1.5});
      const sw = n ? h("span", {class: "swatch", style: `background:${VIEW_COLORS[(n - 1) % 8]}`}) : "";
      return h("figure", {class: "view-panel", "data-view": name}, c, h("figcaption", {}, sw, ` ${name} · ${cnt} above threshold`));
    }));
  }

  function edited() {
    localStorage.setItem(draftKey(D.item.image), JSON.stringify(D.instances));
    setDirty(true);
    drawEditor();
  }
  function pushUndo() { D.undo.push(JSON.stringify({i: D.instances, c: D.candidates})); }

  // selected >= 0: an instance; selected <= -2: candidate -selected-2
  function hit(px, py) {
    const [x, y] = toImage(px, py), z = k();
    for (let i = D.instances.length - 1; i >= 0; i--) {
      const d = D.instances[i];
      if (d.keypoints) for (let n = 0; n < d.keypoints.length; n += 3)
        if (Math.hypot(d.keypoints[n] - x, d.keypoints[n + 1] - y) * z < 6) return {i, kp: n};
      const [bx, by, bw, bh] = d.bbox;
      if (Math.abs(bx + bw - x) * z < 7 && Math.abs(by + bh - y) * z < 7) return {i, corner: true};
      if (x >= bx && x <= bx + bw && y >= by && y <= by + bh) return {i};
    }
    for (let i = D.candidates.length - 1; i >= 0; i--) {
      const [bx, by, bw, bh] = D.candidates[i].bbox;
      if (x >= bx && x <= bx + bw && y >= by && y <= by + bh) return {candidate: i};
    }
    return null;
  }

  let spaceDown = false;
  editor.addEventListener("mousedown", (e) => {
    const r = editor.getBoundingClientRect(), px = e.clientX - r.left, py = e.clientY - r.top;
    if (e.button === 1 || e.altKey || spaceDown) {  // pan: middle button, or drag with Alt or Space held
      D.drag = {pan: true, x0: px, y0: py, px0: D.panX, py0: D.panY}; e.preventDefault(); return;
    }
    const [ix, iy] = toImage(px, py);
    if (D.mode === "new") {
      pushUndo();
      const cat = +$("box-class").value || state.cats[0].id;
      const kpN = (state.cats.find((c) => c.id === cat).keypoints || []).length;
      D.instances.push({bbox: [ix, iy, 1, 1], category_id: cat, score: 1,
        ...(kpN ? {keypoints: Array.from({length: kpN}, () => [ix, iy, 0]).flat()} : {})});
      D.selected = D.instances.length - 1; D.mode = null;
      D.drag = {corner: true, x0: px, y0: py, i: D.selected, isNew: true,
        orig: {...D.instances[D.selected], bbox: [ix, iy, 0, 0]}};  // the box spans the drag
      return;
    }
    const h_ = hit(px, py);
    if (h_ && h_.candidate !== undefined) { D.selected = -h_.candidate - 2; $("box-class").value = D.candidates[h_.candidate].category_id; drawEditor(); return; }
    D.selected = h_ ? h_.i : -1;
    if (h_) { pushUndo(); D.drag = {...h_, x0: px, y0: py, moved: false, orig: JSON.parse(JSON.stringify(D.instances[h_.i]))}; $("box-class").value = D.instances[h_.i].category_id; }
    drawEditor();
  });
  editor.addEventListener("mousemove", (e) => {
    if (!D.drag) return;
    const r = editor.getBoundingClientRect(), px = e.clientX - r.left, py = e.clientY - r.top;
    if (D.drag.pan) { D.panX = D.drag.px0 + px - D.drag.x0; D.panY = D.drag.py0 + py - D.drag.y0; clampPan(); drawEditor(); return; }
    const d = D.instances[D.drag.i], dx = (px - D.drag.x0) / k(), dy = (py - D.drag.y0) / k();
    D.drag.moved = true;
    if (D.drag.kp !== undefined) { d.keypoints[D.drag.kp] = D.drag.orig.keypoints[D.drag.kp] + dx; d.keypoints[D.drag.kp + 1] = D.drag.orig.keypoints[D.drag.kp + 1] + dy; d.keypoints[D.drag.kp + 2] = 2; }
    else if (D.drag.corner) { const o = D.drag.orig; d.bbox = [d.bbox[0], d.bbox[1], Math.max(1, o.bbox[2] + dx), Math.max(1, o.bbox[3] + dy)]; }
    else { d.bbox = [D.drag.orig.bbox[0] + dx, D.drag.orig.bbox[1] + dy, d.bbox[2], d.bbox[3]];
      if (d.keypoints) for (let n = 0; n < d.keypoints.length; n += 3) { d.keypoints[n] = D.drag.orig.keypoints[n] + dx; d.keypoints[n + 1] = D.drag.orig.keypoints[n + 1] + dy; } }
    drawEditor();
  });
  window.addEventListener("mouseup", () => {
    if (!D.drag) return;
    const drag = D.drag; D.drag = null;
    if (drag.pan) return;
    if (drag.isNew) layOutKeypoints(D.instances[drag.i]);
    if (!drag.moved && !drag.isNew) { D.undo.pop(); return; }  // a click that selected: nothing changed
    edited();
  });
  editor.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = editor.getBoundingClientRect();
    zoomAt(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - r.left, e.clientY - r.top);
  }, {passive: false});

  /* A new box in a keypoint project: its keypoints start unlabeled (v = 0, drawn hollow) at the
     mean pose, relative to their boxes, of the image's other instances with keypoints (else
     spread down the box), so there is something to drag; a dragged keypoint becomes labeled. */
  function layOutKeypoints(d) {
    if (!d.keypoints) return;
    const n = d.keypoints.length / 3, sum = Array.from({length: n}, () => [0, 0, 0]);
    for (const o of D.instances) {
      if (o === d || !o.keypoints || o.keypoints.length !== d.keypoints.length || o.bbox[2] < 2 || o.bbox[3] < 2) continue;
      for (let q = 0; q < n; q++) if (o.keypoints[3 * q + 2] > 0) {
        sum[q][0] += (o.keypoints[3 * q] - o.bbox[0]) / o.bbox[2]; sum[q][1] += (o.keypoints[3 * q + 1] - o.bbox[1]) / o.bbox[3]; sum[q][2]++;
      }
    }
    const [bx, by, bw, bh] = d.bbox;
    for (let q = 0; q < n; q++) {
      const [u, v] = sum[q][2] ? [sum[q][0] / sum[q][2], sum[q][1] / sum[q][2]] : [0.5, (q + 0.5) / n];
      d.keypoints.splice(3 * q, 3, bx + u * bw, by + v * bh, 0);
    }
  }

  /* One instance: reject (delete) it, accept it (a candidate below the threshold joins the kept
     ones; a kept one is confirmed, score 1), or change its class. */
  function deleteSelected() {
    if (D.selected === -1) return toast("select a box first");
    pushUndo();
    if (D.selected >= 0) D.instances.splice(D.selected, 1); else D.candidates.splice(-D.selected - 2, 1);
    D.selected = -1; edited();
  }
  function acceptSelected() {
    if (D.selected === -1) return toast("select a box first");
    pushUndo();
    if (D.selected <= -2) { const [d] = D.candidates.splice(-D.selected - 2, 1); D.instances.push({...d, score: 1}); D.selected = D.instances.length - 1; }
    else D.instances[D.selected].score = 1;
    edited();
  }
  function relabel(cat) {
    if (D.selected === -1) return toast("select a box first");
    pushUndo();
    const d = D.selected >= 0 ? D.instances[D.selected] : D.candidates[-D.selected - 2];
    d.category_id = cat; $("box-class").value = cat; edited();
  }
  $("box-class").addEventListener("change", (e) => { if (D.selected !== -1) relabel(+e.target.value); });

  async function saveReview(stateName) {
    const body = {run: RUN, image: D.item.image, state: stateName};
    if (stateName === "edited") body.instances = D.instances.map((d) => ({bbox: d.bbox.map((v) => +v.toFixed(2)), category_id: d.category_id,
      score: d.score ?? 1, ...(d.keypoints ? {keypoints: d.keypoints.map((v) => +v.toFixed(2))} : {})}));
    try {
      const r = await api("/api/reviews/", {method: "POST", body});
      localStorage.removeItem(draftKey(D.item.image));
      $("draft-note").textContent = "";
      D.item.review = r;
      // saved: what is on screen is what the server holds; undo (u) now undoes the saved review
      D.undo = []; setDirty(false);
      showReviewBadge();
      const t = tiles.get(D.index); if (t) drawTile(t);
      toast(stateName === "edited" ? "edits saved — u undoes the save" : stateName);
      return r;
    } catch (e) { fail(e); return null; }
  }

  /* Undo means the same on screen and on the server: unsaved edits are undone one step at a
     time; with none left, the saved review itself is undone through the API (back to its
     previous version, or to no review), and the screen shows what the server then holds. */
  async function undo() {
    if (D.undo.length) {
      const u = JSON.parse(D.undo.pop()); D.instances = u.i; D.candidates = u.c; D.selected = -1;
      if (D.undo.length) edited();
      else { localStorage.removeItem(draftKey(D.item.image)); setDirty(false); drawEditor(); }
      return;
    }
    if (D.dirty) {  // edits restored from the browser, never saved: undo drops them
      localStorage.removeItem(draftKey(D.item.image)); loadInstances(); drawEditor(); return toast("unsaved edits dropped");
    }
    if (!D.item.review) return toast("nothing to undo");
    try {
      const r = await api(`/api/reviews/${D.item.review.id}/undo/`, {method: "POST"});
      D.item.review = r;
      toast(r ? `saved review undone: now ${r.state}` : "saved review undone: not reviewed");
      showReviewBadge(); loadInstances(); drawEditor(); renderViews();
      const t = tiles.get(D.index); if (t) drawTile(t);
    } catch (e) { fail(e); }
  }

  // leaving an image with unsaved edits saves them
  async function leave() {
    if (D.dirty && D.item) return !!(await saveReview("edited"));
    return true;
  }
  const move = async (n) => {
    const j = D.index + n;
    if (j < 0 || j >= state.total) return toast(j < 0 ? "first image" : "last image");
    if (!(await leave())) return;
    if (!state.items[j]) { await loadPage(Math.floor(j / PAGE) + 1); }
    if (state.items[j]) openDetail(j);
  };
  // a and r review the whole image; with unsaved edits, a accepts the edited boxes
  async function review(stateName) {
    const r = await saveReview(stateName === "accepted" && D.dirty ? "edited" : stateName);
    if (r) move(1);
  }
  $("btn-prev").onclick = () => move(-1);
  $("btn-next").onclick = () => move(1);
  $("btn-new").onclick = () => { D.mode = "new"; toast("drag on the image to draw the new box"); };
  $("btn-delete").onclick = deleteSelected;
  $("btn-keep").onclick = acceptSelected;
  $("btn-save").onclick = () => saveReview("edited");
  $("btn-accept").onclick = () => review("accepted");
  $("btn-reject").onclick = () => review("rejected");
  $("btn-undo").onclick = undo;
  $("btn-fit").onclick = fit;
  $("btn-zoom-in").onclick = () => zoomAt(1.25);
  $("btn-zoom-out").onclick = () => zoomAt(0.8);
  $("btn-close").onclick = async () => { if (await leave()) dlg.close(); };
  dlg.addEventListener("cancel", (e) => { if (D.dirty) { e.preventDefault(); leave().then((ok) => ok && dlg.close()); } });
  $("overlay-views").onchange = () => { drawEditor(); editor.focus(); };
  dlg.addEventListener("keyup", (e) => { if (e.key === " ") spaceDown = false; });
  dlg.addEventListener("keydown", (e) => {
    const t = e.target;
    // typing into a text field or choosing in a list keeps its keys; checkboxes and buttons do not
    if (t.tagName === "SELECT" || t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && !["checkbox", "radio", "button"].includes(t.type))) return;
    if (e.ctrlKey && e.key !== "z" || e.metaKey && e.key !== "z") return;
    const key = e.key;
    if (key === " ") { spaceDown = true; }
    else if (key === "ArrowRight" || key === "j") move(1);
    else if (key === "ArrowLeft" || key === "k") move(-1);
    else if (key === "a") review("accepted");
    else if (key === "r") review("rejected");
    else if (key === "Delete" || key === "Backspace" || key === "x") deleteSelected();
    else if (key === "y") acceptSelected();
    else if (key === "n") $("btn-new").click();
    else if (key === "s") saveReview("edited");
    else if (key === "u" || (key === "z" && (e.ctrlKey || e.metaKey))) undo();
    else if (key === "+" || key === "=") zoomAt(1.25);
    else if (key === "-") zoomAt(0.8);
    else if (key === "0" || key === "f") fit();
    else if (/^[1-9]$/.test(key) && state.cats[+key - 1]) relabel(state.cats[+key - 1].id);
    else if (key === "Escape") return;
    else return;
    e.preventDefault();
  });

  /* ---- toolbar ---- */
  const onFilter = (key, el, ev = "change") => $(el).addEventListener(ev, (e) => { state[key] = e.target.value.trim(); resetGrid(); });
  onFilter("order", "ordering"); onFilter("category", "filter-category"); onFilter("review", "filter-review");
  onFilter("smin", "filter-smin"); onFilter("smax", "filter-smax"); onFilter("kmin", "filter-kmin"); onFilter("kmax", "filter-kmax");
  onFilter("agree", "filter-agree"); onFilter("dclass", "filter-disagree");
  $("filter-category").addEventListener("change", redrawTiles);
  $("filter-disagree").addEventListener("change", () => { showDisagree(); redrawTiles(); });
  $("filter-agree").addEventListener("change", showDisagree);

  /* Bulk accept: the count first (a dry run with the same thresholds), then one undo for all. */
  let lastBulk = null;
  $("bulk-accept").onclick = async () => {
    const body = {threshold: state.global, thresholds: state.perClass ? currentThresholds() : {}};
    try {
      const dry = await api(`/api/inference-runs/${RUN}/bulk-accept/`, {method: "POST", body: {...body, dry_run: true}});
      if (!dry.accepted) return toast("no unreviewed image has a pseudo-label above the threshold");
      const ok = await confirmDialog(`Accept ${dry.accepted.toLocaleString()} unreviewed images that have a pseudo-label above the threshold? One undo reverts them all.`,
        {ok: `Accept ${dry.accepted.toLocaleString()} images`});
      if (!ok) return;
      const r = await api(`/api/inference-runs/${RUN}/bulk-accept/`, {method: "POST", body});
      lastBulk = r.images || [];
      $("bulk-undo").hidden = !lastBulk.length;
      $("bulk-undo").textContent = `Undo accepting ${r.accepted} images`;
      toast(`${r.accepted} images accepted`); resetGrid();
    } catch (e) { fail(e); }
  };
  $("bulk-undo").onclick = async () => {
    if (!lastBulk) return;
    try {
      const r = await api(`/api/inference-runs/${RUN}/bulk-undo/`, {method: "POST", body: {images: lastBulk}});
      lastBulk = null; $("bulk-undo").hidden = true;
      toast(`${r.undone} acceptances undone`); resetGrid();
    } catch (e) { fail(e); }
  };
  grid.addEventListener("scroll", () => requestAnimationFrame(layout), {passive: true});
  window.addEventListener("resize", () => requestAnimationFrame(layout));

  /* ---- launching the student: one click, one run (request_key), progress on its own page ---- */
  let requestKey = crypto.randomUUID();
  $("student-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const btn = $("launch");
    if (btn.disabled) return;
    btn.disabled = true; btn.textContent = "Writing pseudo-labels…";
    const f = new FormData(e.target);
    // empty = "auto" (null): the worker sizes the bound; with validation it stops once AP converges
    const iterations = String(f.get("iterations") ?? "").trim() === "" ? null : +f.get("iterations");
    try {
      const kp = f.get("keypoint_threshold");
      let pls = await api("/api/pseudo-label-sets/", {method: "POST", body: {
        run: RUN, thresholds: currentThresholds(), apply_reviews: true,
        ...(kp ? {keypoint_threshold: kp === "none" ? null : kp} : {})}});
      while (!["succeeded", "failed", "cancelled"].includes(pls.job.state)) {
        await new Promise((r) => setTimeout(r, 700));
        pls = await api(`/api/pseudo-label-sets/${pls.id}/`);
      }
      if (pls.job.state !== "succeeded") throw new Error(pls.job.error || "writing the pseudo-labels failed");
      btn.textContent = "Starting the student…";
      const ds = await api(`/api/datasets/?project=${PID}&role=labeled`);
      const teacher = await api(`/api/models/${state.run.checkpoint}/`);
      const run = await api("/api/training-runs/", {method: "POST", body: {
        project: PID, arch: teacher.arch, labeled: ds.results[0].id, validation: state.run.validation,
        pseudo_label_set: pls.id, teacher: state.run.checkpoint, init: f.get("init"), request_key: requestKey,
        min_size: teacher.meta.min_size || null,
        config: {iterations, ratio: f.get("ratio"), batch_size: (teacher.meta.config || {}).batch_size || 8,
                 lr: (teacher.meta.config || {}).lr || 0.02, checkpoint_every: 50,
                 ...(iterations ? {warmup_iters: Math.min(100, Math.max(1, Math.floor(iterations / 4)))} : {})}}});
      location.href = `/training/${run.id}/`;
    } catch (err) {
      fail(err); btn.disabled = false; btn.textContent = "Create pseudo-labels & train student"; requestKey = crypto.randomUUID();
    }
  });

  /* ---- start ---- */
  (async () => {
    try {
      state.run = await api(`/api/inference-runs/${RUN}/`);
      state.project = await api(`/api/projects/${PID}/`);
      state.cats = state.project.categories;
      const sc = await api(`/api/inference-runs/${RUN}/scores/`);
      state.S = Float32Array.from(sc.scores); state.C = Int32Array.from(sc.categories); state.I = Int32Array.from(sc.image_index);
      state.nImages = sc.image_ids.length; state.val = sc.validation; state.labeledPerImage = sc.summary.labeled_instances_per_image;
      state.global = snap(state.run.auto_threshold ?? 0.5);
      document.querySelector("#student-form .no-val-note").hidden = !!state.run.validation;
      document.querySelectorAll("#student-form .kp-only").forEach((el) => (el.hidden = state.project.task !== "keypoints"));
      $("auto-value").textContent = state.run.auto_threshold == null ? "(n/a)" : state.run.auto_threshold.toFixed(2);
      buildClassSliders();
      readUrl();
      showThresholds(); showFilters();
      buildCharts(sc.summary);
      renderStats(computeStats());
      resetGrid();
      $("kp-threshold").addEventListener("change", refreshKeypointCut);
      await refreshKeypointCut();
      root.dataset.ready = "1";
    } catch (e) { fail(e); }
  })();
})();
