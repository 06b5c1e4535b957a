/* The review screen. Statistics and overlays are recomputed in the browser from flat score arrays
   on every slider movement (no round trip); images stream in by page as the grid scrolls; edits
   are stored as reviews through the API and never touch the raw predictions. */
"use strict";
(() => {
  const {api, h, fail, toast, colorOf, drawInstances} = Distill;
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
    items: [], total: 0, loading: new Set(), order: "agreement", category: "", review: "",
  };
  let hist = null, pr = null;

  const thresholdOf = (cat) => (state.perClass && state.classT[cat] !== undefined ? state.classT[cat] : state.global);

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

  /* The threshold line and the current precision/recall point live on canvases laid over the
     charts, so a slider movement repaints two thin overlays instead of re-rendering the charts. */
  function overlayFor(chart) {
    const c = chart.canvas, o = h("canvas", {class: "chart-overlay", width: c.width, height: c.height,
      style: `position:absolute;left:0;top:0;width:${c.style.width};height:${c.style.height};pointer-events:none`});
    c.parentNode.append(o);
    return o;
  }
  let histOverlay = null, prOverlay = null;
  function drawMarkers(s) {
    const dpr = window.devicePixelRatio || 1;
    if (hist) {
      histOverlay = histOverlay || overlayFor(hist);
      const ctx = histOverlay.getContext("2d"), x = hist.scales.x, y = hist.scales.y;
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, histOverlay.width, histOverlay.height);
      const px = x.left + (x.right - x.left) * state.global;
      ctx.strokeStyle = "#d00"; ctx.lineWidth = 2; ctx.beginPath(); ctx.moveTo(px, y.top); ctx.lineTo(px, y.bottom); ctx.stroke();
    }
    if (pr && s.precision != null) {
      prOverlay = prOverlay || overlayFor(pr);
      const ctx = prOverlay.getContext("2d"), x = pr.scales.x, y = pr.scales.y;
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, prOverlay.width, prOverlay.height);
      ctx.fillStyle = "#d00";
      for (const v of [s.precision, s.recall]) {
        ctx.beginPath(); ctx.arc(x.getPixelForValue(state.global), y.getPixelForValue(v * 100), 4, 0, 2 * Math.PI); ctx.fill();
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
          title: {display: true, text: "ensembled scores (red: threshold, green: automatic)"}},
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

  /* ---- grid: virtual scrolling over all images, pages fetched on demand ---- */
  const grid = $("grid"), inner = $("grid-inner");
  const tiles = new Map();  // index -> element

  function query(page) {
    const q = new URLSearchParams({page, page_size: PAGE, ordering: state.order, views: "false"});
    if (state.category) q.set("category", state.category);
    if (state.review) q.set("review", state.review);
    return `/api/inference-runs/${RUN}/predictions/?${q}`;
  }

  async function loadPage(page) {
    if (state.loading.has(page)) return;
    state.loading.add(page);
    const gen = state.gen;
    try {
      const d = await api(query(page));
      if (gen !== state.gen) return;
      state.total = d.count;
      d.results.forEach((r, k) => (state.items[(page - 1) * PAGE + k] = r));
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
    return {list: item.ensembled};
  }

  function drawTile(t) {
    const item = t._item, ctx = t._canvas.getContext("2d");
    ctx.clearRect(0, 0, t._canvas.width, t._canvas.height);
    const {list, edited, rejected} = tileInstances(item);
    const n = drawInstances(ctx, list, state.cats, t._s, {threshold: edited ? () => 0 : thresholdOf, lineWidth: 1.5});
    t.dataset.drawn = n;
    t.classList.toggle("rejected", !!rejected);
    t.classList.toggle("accepted", item.review && item.review.state === "accepted");
    t.classList.toggle("edited", !!edited);
  }

  function redrawTiles() { for (const t of tiles.values()) drawTile(t); }

  function resetGrid() {
    state.gen = (state.gen || 0) + 1;
    state.items = []; state.total = 0; state.loading.clear();
    for (const t of tiles.values()) t.remove();
    tiles.clear(); grid.scrollTop = 0;
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
  }

  $("threshold").addEventListener("input", (e) => { state.global = +e.target.value; onThresholdChange(); });
  $("use-auto").addEventListener("click", () => {
    if (state.run.auto_threshold == null) return toast("no automatic threshold: the project has no labeled set", "error");
    state.global = state.run.auto_threshold; $("threshold").value = state.global; onThresholdChange();
  });
  $("per-class").addEventListener("change", (e) => {
    state.perClass = e.target.checked; $("class-sliders").hidden = !state.perClass; onThresholdChange();
  });

  function buildClassSliders() {
    $("class-sliders").replaceChildren(...state.cats.map((c) => {
      state.classT[c.id] = state.global;
      const out = h("output", {}, state.global.toFixed(2));
      const input = h("input", {type: "range", min: 0, max: 1, step: 0.001, value: state.global, "aria-label": `threshold for ${c.name}`,
        oninput: (e) => { state.classT[c.id] = +e.target.value; out.textContent = (+e.target.value).toFixed(3); onThresholdChange(); }});
      return h("div", {class: "slider-row"}, h("span", {class: "swatch", style: `background:${colorOf(state.cats, c.id)}`}), h("span", {class: "cname"}, c.name), input, out);
    }));
    $("filter-category").append(...state.cats.map((c) => h("option", {value: c.id}, c.name)));
  }

  function currentThresholds() {
    const t = {default: state.global};
    if (state.perClass) for (const [k, v] of Object.entries(state.classT)) t[k] = v;
    return t;
  }

  /* ---- detail: compare views, edit, review ---- */
  const dlg = $("detail"), editor = $("editor");
  const D = {index: -1, item: null, views: null, instances: [], selected: -1, undo: [], mode: null, drag: null, scale: 1, img: null};
  const draftKey = (imageId) => `distill-draft-${RUN}-${imageId}`;

  async function openDetail(i) {
    const item = state.items[i];
    if (!item) return;
    D.index = i; D.item = item; D.selected = -1; D.undo = []; D.mode = null;
    const full = await api(`/api/inference-runs/${RUN}/predictions/?image=${item.image}&views=true`).catch(fail);
    if (!full) return;
    const rec = full.results[0];
    Object.assign(item, {review: rec.review});
    D.views = rec.views || {};
    const {list, edited} = tileInstances(item);
    D.instances = JSON.parse(JSON.stringify(edited ? list : list.filter((d) => d.score >= thresholdOf(d.category_id))));
    const draft = localStorage.getItem(draftKey(item.image));
    $("draft-note").textContent = "";
    if (draft) { D.instances = JSON.parse(draft); $("draft-note").textContent = "Unsaved edits restored from this browser — save (s) to keep them."; }
    $("detail-title").textContent = item.file_name;
    $("detail-agreement").textContent = `agreement ${item.agreement.toFixed(2)}`;
    $("detail-review").textContent = item.review ? item.review.state : "not reviewed";
    D.img = new Image();
    D.img.onload = () => { sizeEditor(); drawEditor(); renderViews(); };
    D.img.src = item.url;
    $("box-class").replaceChildren(...state.cats.map((c) => h("option", {value: c.id}, c.name)));
    if (!dlg.open) dlg.showModal();
  }

  function sizeEditor() {
    const maxW = Math.min(720, window.innerWidth * 0.55), maxH = window.innerHeight - 160;
    D.scale = Math.min(maxW / D.item.width, maxH / D.item.height);
    editor.width = Math.round(D.item.width * D.scale); editor.height = Math.round(D.item.height * D.scale);
  }

  function drawEditor() {
    const ctx = editor.getContext("2d");
    ctx.drawImage(D.img, 0, 0, editor.width, editor.height);
    if ($("overlay-views").checked) {
      Object.keys(D.views).forEach((v, k) => drawInstances(ctx, D.views[v], state.cats, D.scale,
        {threshold: thresholdOf, lineWidth: 1, dashed: true, color: ["#ff0", "#0ff", "#f0f", "#fff", "#fa0", "#0fa", "#a0f", "#aaa"][k % 8]}));
    }
    drawInstances(ctx, D.instances, state.cats, D.scale, {lineWidth: 2, selected: D.selected, unplaced: true});
    if (D.selected >= 0) {
      const [x, y, w, hh] = D.instances[D.selected].bbox;
      ctx.fillStyle = "#fff"; ctx.fillRect((x + w) * D.scale - 4, (y + hh) * D.scale - 4, 8, 8);
    }
    editor.dataset.instances = D.instances.length;
  }

  function renderViews() {
    const panels = [["ensembled", D.item.ensembled], ...Object.entries(D.views)];
    $("views").replaceChildren(...panels.map(([name, list]) => {
      const s = 150 / Math.max(D.item.width, D.item.height);
      const c = h("canvas", {width: Math.round(D.item.width * s), height: Math.round(D.item.height * s)});
      const ctx = c.getContext("2d");
      ctx.drawImage(D.img, 0, 0, c.width, c.height);
      const n = drawInstances(ctx, list, state.cats, s, {threshold: thresholdOf, lineWidth: 1.5});
      return h("figure", {class: "view-panel", "data-view": name}, c, h("figcaption", {}, `${name} · ${n} above threshold`));
    }));
  }

  function edited() {
    localStorage.setItem(draftKey(D.item.image), JSON.stringify(D.instances));
    drawEditor();
  }
  function pushUndo() { D.undo.push(JSON.stringify(D.instances)); }

  function hit(px, py) {
    const x = px / D.scale, y = py / D.scale;
    for (let i = D.instances.length - 1; i >= 0; i--) {
      const d = D.instances[i];
      if (d.keypoints) for (let k = 0; k < d.keypoints.length; k += 3)
        if (Math.hypot(d.keypoints[k] - x, d.keypoints[k + 1] - y) * D.scale < 6) return {i, kp: k};
      const [bx, by, bw, bh] = d.bbox;
      if (Math.abs(bx + bw - x) * D.scale < 7 && Math.abs(by + bh - y) * D.scale < 7) return {i, corner: true};
      if (x >= bx && x <= bx + bw && y >= by && y <= by + bh) return {i};
    }
    return null;
  }

  editor.addEventListener("mousedown", (e) => {
    const r = editor.getBoundingClientRect(), px = e.clientX - r.left, py = e.clientY - r.top;
    if (D.mode === "new") {
      pushUndo();
      const cat = +$("box-class").value || state.cats[0].id;
      const kpN = (state.cats.find((c) => c.id === cat).keypoints || []).length;
      D.instances.push({bbox: [px / D.scale, py / D.scale, 1, 1], category_id: cat, score: 1,
        ...(kpN ? {keypoints: Array.from({length: kpN}, () => [px / D.scale, py / D.scale, 0]).flat()} : {})});
      D.selected = D.instances.length - 1; D.mode = null;
      D.drag = {corner: true, x0: px, y0: py, i: D.selected, isNew: true,
        orig: {...D.instances[D.selected], bbox: [px / D.scale, py / D.scale, 0, 0]}};  // the box spans the drag
      return;
    }
    const h_ = hit(px, py);
    D.selected = h_ ? h_.i : -1;
    if (h_) { pushUndo(); D.drag = {...h_, x0: px, y0: py, orig: JSON.parse(JSON.stringify(D.instances[h_.i]))}; $("box-class").value = D.instances[h_.i].category_id; }
    drawEditor();
  });
  editor.addEventListener("mousemove", (e) => {
    if (!D.drag) return;
    const r = editor.getBoundingClientRect(), px = e.clientX - r.left, py = e.clientY - r.top;
    const d = D.instances[D.drag.i], dx = (px - D.drag.x0) / D.scale, dy = (py - D.drag.y0) / D.scale;
    if (D.drag.kp !== undefined) { d.keypoints[D.drag.kp] = D.drag.orig.keypoints[D.drag.kp] + dx; d.keypoints[D.drag.kp + 1] = D.drag.orig.keypoints[D.drag.kp + 1] + dy; d.keypoints[D.drag.kp + 2] = 2; }
    else if (D.drag.corner) { const o = D.drag.orig; d.bbox = [d.bbox[0], d.bbox[1], Math.max(1, o.bbox[2] + dx), Math.max(1, o.bbox[3] + dy)]; }
    else { d.bbox = [D.drag.orig.bbox[0] + dx, D.drag.orig.bbox[1] + dy, d.bbox[2], d.bbox[3]];
      if (d.keypoints) for (let k = 0; k < d.keypoints.length; k += 3) { d.keypoints[k] = D.drag.orig.keypoints[k] + dx; d.keypoints[k + 1] = D.drag.orig.keypoints[k + 1] + dy; } }
    drawEditor();
  });
  window.addEventListener("mouseup", () => {
    if (!D.drag) return;
    if (D.drag.isNew) layOutKeypoints(D.instances[D.drag.i]);
    D.drag = null; edited();
  });

  /* A new box in a keypoint project: its keypoints start unlabeled (v = 0, drawn hollow) at the
     mean pose, relative to their boxes, of the image's other instances with keypoints (else
     spread down the box), so there is something to drag; a dragged keypoint becomes labeled. */
  function layOutKeypoints(d) {
    if (!d.keypoints) return;
    const n = d.keypoints.length / 3, sum = Array.from({length: n}, () => [0, 0, 0]);
    for (const o of D.instances) {
      if (o === d || !o.keypoints || o.keypoints.length !== d.keypoints.length || o.bbox[2] < 2 || o.bbox[3] < 2) continue;
      for (let k = 0; k < n; k++) if (o.keypoints[3 * k + 2] > 0) {
        sum[k][0] += (o.keypoints[3 * k] - o.bbox[0]) / o.bbox[2]; sum[k][1] += (o.keypoints[3 * k + 1] - o.bbox[1]) / o.bbox[3]; sum[k][2]++;
      }
    }
    const [bx, by, bw, bh] = d.bbox;
    for (let k = 0; k < n; k++) {
      const [u, v] = sum[k][2] ? [sum[k][0] / sum[k][2], sum[k][1] / sum[k][2]] : [0.5, (k + 0.5) / n];
      d.keypoints.splice(3 * k, 3, bx + u * bw, by + v * bh, 0);
    }
  }

  function deleteSelected() {
    if (D.selected < 0) return toast("select a box first");
    pushUndo(); D.instances.splice(D.selected, 1); D.selected = -1; edited();
  }
  $("box-class").addEventListener("change", (e) => {
    if (D.selected < 0) return;
    pushUndo(); D.instances[D.selected].category_id = +e.target.value; edited();
  });

  async function saveReview(stateName) {
    const body = {run: RUN, image: D.item.image, state: stateName};
    if (stateName === "edited") body.instances = D.instances.map((d) => ({bbox: d.bbox.map((v) => +v.toFixed(2)), category_id: d.category_id,
      score: d.score ?? 1, ...(d.keypoints ? {keypoints: d.keypoints.map((v) => +v.toFixed(2))} : {})}));
    try {
      const r = await api("/api/reviews/", {method: "POST", body});
      localStorage.removeItem(draftKey(D.item.image));
      $("draft-note").textContent = "";
      D.item.review = r;
      $("detail-review").textContent = r.state;
      const t = tiles.get(D.index); if (t) drawTile(t);
      toast(stateName === "edited" ? "edits saved" : stateName);
      return r;
    } catch (e) { fail(e); }
  }

  async function undo() {
    if (D.undo.length) { D.instances = JSON.parse(D.undo.pop()); D.selected = -1; edited(); return; }
    if (!D.item.review) return toast("nothing to undo");
    try {
      const r = await api(`/api/reviews/${D.item.review.id}/undo/`, {method: "POST"});
      D.item.review = r; toast("review undone");
      const item = D.item; await openDetail(D.index); Object.assign(item, {review: r});
      const t = tiles.get(D.index); if (t) drawTile(t);
    } catch (e) { fail(e); }
  }

  const move = (k) => { const j = D.index + k; if (j >= 0 && j < state.total && state.items[j]) openDetail(j); };
  $("btn-new").onclick = () => { D.mode = "new"; toast("drag on the image to draw the new box"); };
  $("btn-delete").onclick = deleteSelected;
  $("btn-save").onclick = () => saveReview("edited");
  $("btn-accept").onclick = async () => { await saveReview("accepted"); move(1); };
  $("btn-reject").onclick = async () => { await saveReview("rejected"); move(1); };
  $("btn-undo").onclick = undo;
  $("btn-close").onclick = () => dlg.close();
  $("overlay-views").onchange = drawEditor;
  dlg.addEventListener("keydown", (e) => {
    if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT") return;
    const k = e.key;
    if (k === "ArrowRight" || k === "j") move(1);
    else if (k === "ArrowLeft" || k === "k") move(-1);
    else if (k === "a") $("btn-accept").click();
    else if (k === "r") $("btn-reject").click();
    else if (k === "Delete" || k === "Backspace") deleteSelected();
    else if (k === "n") $("btn-new").click();
    else if (k === "s") saveReview("edited");
    else if (k === "u" || (k === "z" && (e.ctrlKey || e.metaKey))) undo();
    else return;
    e.preventDefault();
  });

  /* ---- toolbar ---- */
  $("ordering").onchange = (e) => { state.order = e.target.value; resetGrid(); };
  $("filter-category").onchange = (e) => { state.category = e.target.value; resetGrid(); };
  $("filter-review").onchange = (e) => { state.review = e.target.value; resetGrid(); };
  $("bulk-accept").onclick = async () => {
    try {
      const r = await api(`/api/inference-runs/${RUN}/bulk-accept/`, {method: "POST", body: {threshold: state.global, thresholds: state.perClass ? state.classT : {}}});
      toast(`${r.accepted} images accepted`); resetGrid();
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
    try {
      let pls = await api("/api/pseudo-label-sets/", {method: "POST", body: {run: RUN, thresholds: currentThresholds(), apply_reviews: true}});
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
        config: {iterations: +f.get("iterations"), ratio: f.get("ratio"), batch_size: (teacher.meta.config || {}).batch_size || 8,
                 lr: (teacher.meta.config || {}).lr || 0.02, warmup_iters: Math.min(100, Math.max(1, Math.floor(+f.get("iterations") / 4))),
                 checkpoint_every: 50}}});
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
      state.global = state.run.auto_threshold ?? 0.5;
      $("threshold").value = state.global; $("threshold-value").textContent = state.global.toFixed(3);
      $("auto-value").textContent = state.run.auto_threshold == null ? "(n/a)" : state.run.auto_threshold.toFixed(2);
      buildClassSliders();
      buildCharts(sc.summary);
      renderStats(computeStats());
      resetGrid();
      root.dataset.ready = "1";
    } catch (e) { fail(e); }
  })();
})();
