/* The project page: the pipeline as steps, data, teacher, inference, students and evaluation. */
"use strict";
(() => {
  const {api, all, h, fail, toast, progressBar, jobText, confirmDialog} = Distill;
  const app = document.getElementById("app");
  const PID = +app.dataset.project, TASK = app.dataset.task;
  const ARCHS = TASK === "keypoints"
    ? ["keypointrcnn_tiny", "keypointrcnn_resnet18_fpn", "keypointrcnn_resnet50_fpn"]
    : ["fasterrcnn_tiny", "fasterrcnn_resnet18_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn"];
  let apChart = null;
  const FINAL = ["succeeded", "failed", "cancelled"];

  document.getElementById("arch").replaceChildren(...ARCHS.map((a) => h("option", {value: a}, a)));

  // a job's line: live progress and time left while it runs; once final, its outcome (never a stale message)
  function jobLine(job, link, cancelUrl) {
    const live = job.state === "running" || job.state === "queued";
    return h("div", {class: "job " + job.state},
      h("span", {class: "badge " + job.state}, job.state === "succeeded" ? "done" : job.state), " ",
      link || "", live ? progressBar(job.progress, `${Math.round(job.progress * 100)}% · ${jobText(job)}`) : h("span", {class: "muted small"}, " " + jobText(job)),
      live && cancelUrl ? h("button", {class: "link small", onclick: () => cancelJob(cancelUrl)}, "cancel") : "",
      job.error ? h("div", {class: "error"}, job.error) : "");
  }
  async function cancelJob(url) {
    if (!(await confirmDialog("Cancel this job? What it has done so far is kept; retry resumes it.", {ok: "Cancel the job", cancel: "Keep running", danger: true}))) return;
    try { await api(url, {method: "POST"}); toast("cancelling"); refresh(); } catch (e) { fail(e); }
  }

  // The validation set is preselected wherever the project has one; a choice the user made stays.
  function fillSelect(sel, items, label, allowEmpty) {
    const keep = sel.value;
    sel.replaceChildren(...(allowEmpty ? [h("option", {value: ""}, "none")] : []), ...items.map((i) => h("option", {value: i.id}, label(i))));
    if (sel.dataset.touched && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
    else if (allowEmpty && items.length) sel.value = String(items[0].id);
    else if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
  }
  document.querySelectorAll("select").forEach((s) => s.addEventListener("change", () => (s.dataset.touched = "1")));

  async function renderSteps(p) {
    // one word for a finished step ("done", never "succeeded"); each step links to where it is done
    const st = (o) => (!o ? "todo" : o.state === "succeeded" ? "done" : o.state);
    const review = p.inference && p.inference.state === "succeeded" && p.inference.id ? `/runs/${p.inference.id}/review/` : "#infer-card";
    const steps = [
      ["Labeled data", p.datasets.labeled.some((d) => d.n) ? "done" : "todo", "#datasets-card"],
      ["Teacher", p.teacher_checkpoints.length ? "done" : st(p.teacher), "#teacher-card"],
      ["Unlabeled data", p.datasets.unlabeled.some((d) => d.n) ? "done" : "todo", "#datasets-card"],
      ["Inference", st(p.inference), "#infer-card"],
      ["Review", p.reviews ? `${p.reviews} reviewed` : "todo", review],
      ["Student", st(p.student), "#students-card"],
      ["Evaluation", p.evaluations.some((e) => e.checkpoint_role === "student" && e.job.state === "succeeded") ? "done" : "todo", "#students-card"],
    ];
    document.getElementById("steps").replaceChildren(...steps.map(([name, s, href], i) =>
      h("li", {}, h("a", {class: "step " + s.split(" ")[0], href}, h("span", {class: "n"}, i + 1), h("b", {}, name), h("small", {}, s)))));
  }

  // Dataset cards are built once and kept: polling only updates their counts, so an upload's
  // per-file results stay on screen.
  const cards = new Map();
  function datasetCard(d) {
    const results = h("div", {class: "upload-results"});
    const zone = h("div", {class: "drop", tabindex: 0, "data-dataset": d.id}, "Drop images or a .zip here, or click to choose");
    Uploader.attach(zone, d.id, results, refresh);
    const coco = d.role !== "unlabeled" ? h("form", {class: "row coco", onsubmit: async (e) => {
      e.preventDefault();
      try {
        const r = await Distill.upload(`/api/datasets/${d.id}/import-coco/`, new FormData(e.target));
        toast(`${r.annotations} annotations on ${r.images_matched} images`); refresh();
      } catch (err) { fail(err); }
    }}, h("label", {}, "COCO JSON ", h("input", {type: "file", name: "file", accept: ".json,application/json", required: true})), h("button", {}, "Import")) : "";
    const counts = h("p", {class: "muted counts"});
    const card = h("div", {class: "dataset", "data-dataset": d.id}, h("h3", {}, d.name, " ", h("span", {class: "badge"}, d.role)), counts, zone, coco, results);
    card._counts = counts;
    return card;
  }

  const datasetsById = new Map();
  async function renderDatasets() {
    const ds = await all(`/api/datasets/?project=${PID}`);
    for (const d of ds) datasetsById.set(d.id, d);
    const box = document.getElementById("datasets");
    for (const d of ds) {
      if (!cards.has(d.id)) { cards.set(d.id, datasetCard(d)); box.append(cards.get(d.id)); }
      cards.get(d.id)._counts.textContent = `${d.image_count} images, ${d.annotation_count} annotations`;
    }
    for (const role of ["labeled", "unlabeled", "validation"]) {
      document.querySelectorAll(".ds-" + role).forEach((s) =>
        fillSelect(s, ds.filter((d) => d.role === role), (d) => `${d.name} (${d.image_count})`, role === "validation"));
    }
    showNoValNote();
    return ds;
  }

  async function renderRuns() {
    const [runs, ckpts, infer, evals] = await Promise.all([
      all(`/api/training-runs/?project=${PID}`), all(`/api/models/?project=${PID}`),
      all(`/api/inference-runs/?project=${PID}`), all(`/api/evaluations/?project=${PID}`)]);
    // any model can teach: a student is the next round's teacher
    fillSelect(document.getElementById("ckpt-select"), ckpts, (c) => `${c.name} · ${c.role} · ${c.arch}`);
    // no second model unless the user picks one ("distill again" picks the model that taught the student)
    const withSel = document.getElementById("ckpt-with");
    const keepWith = withSel.value;
    withSel.replaceChildren(h("option", {value: ""}, "no other model"), ...ckpts.map((c) => h("option", {value: c.id}, `${c.name} · ${c.role} · ${c.arch}`)));
    if ([...withSel.options].some((o) => o.value === keepWith)) withSel.value = keepWith;
    checkpoints = ckpts; suggestScales();
    document.getElementById("teacher-runs").replaceChildren(...runs.filter((r) => r.role === "teacher").map((r) =>
      jobLine(r.job, h("a", {href: `/training/${r.id}/`}, `teacher run #${r.id} · ${r.arch}`), `/api/training-runs/${r.id}/cancel/`)));
    const ckName = (id) => { const c = ckpts.find((k) => k.id === id); return c ? `${c.name} (${c.role})` : `model ${id}`; };
    const fresh = +new URLSearchParams(location.search).get("inference");
    document.getElementById("infer-runs").replaceChildren(...infer.map((r) => {
      const line = jobLine(r.job, h("span", {}, `run #${r.id} of ${ckName(r.checkpoint)}${r.ensemble_with ? ` + ${ckName(r.ensemble_with)}` : ""}: ${r.view_names.length || r.transforms.scales.length * (r.transforms.flip ? 2 : 1)} views `, r.job.state === "succeeded"
        ? h("a", {class: "button", href: `/runs/${r.id}/review/`}, "Review pseudo-labels") : ""), `/api/inference-runs/${r.id}/cancel/`);
      line.dataset.run = r.id;
      if (r.id === fresh) line.classList.add("fresh");
      return line;
    }));
    const students = runs.filter((r) => r.role === "student");
    document.getElementById("student-runs").replaceChildren(...(students.length ? students.map((r) =>
      jobLine(r.job, h("a", {href: `/training/${r.id}/`}, `student run #${r.id} · ${r.init}`), `/api/training-runs/${r.id}/cancel/`))
      : [h("p", {class: "empty-note", id: "no-students"}, infer.some((r) => r.job.state === "succeeded")
        ? "No student yet: review the pseudo-labels of an inference run, then train a student from the review screen."
        : "No student yet: train a teacher and run inference on the unlabeled set first.")]));
    const name = (id) => { const c = ckpts.find((k) => k.id === id); return c ? c.name : `model ${id}`; };
    const dsName = (id) => { const d = datasetsById.get(id); return d ? d.name : `dataset ${id}`; };
    const done = evals.filter((e) => e.job.state === "succeeded");
    const kind = TASK === "keypoints" ? "keypoints" : "bbox";
    document.getElementById("evals").hidden = !done.length;
    document.getElementById("ap-chart").parentNode.hidden = !done.length;
    document.querySelector("#evals tbody").replaceChildren(...done.map((e) => {
      const s = e.stats[kind] || {};
      return h("tr", {}, h("td", {}, name(e.checkpoint)), h("td", {}, dsName(e.dataset)), h("td", {}, (s.AP ?? 0).toFixed(2)),
        h("td", {}, (s.AP50 ?? 0).toFixed(2)), h("td", {}, (s.AP75 ?? 0).toFixed(2)));
    }));
    if (done.length && window.Chart) {
      const labels = done.map((e) => name(e.checkpoint)).reverse();
      const ds = ["AP", "AP50", "AP75"].map((k, i) => ({label: k, data: done.map((e) => (e.stats[kind] || {})[k] || 0).reverse(),
        backgroundColor: ["#4363d8", "#3cb44b", "#f58231"][i]}));
      if (apChart) { apChart.data.labels = labels; apChart.data.datasets = ds; apChart.update("none"); }
      else apChart = new Chart(document.getElementById("ap-chart"), {type: "bar", data: {labels, datasets: ds},
        options: {animation: false, responsive: true, maintainAspectRatio: false, scales: {y: {beginAtZero: true, title: {display: true, text: kind + " AP (%)"}}}}});
    }
    renderRounds(runs, ckpts, done, kind);
    return [...runs.map((r) => r.job), ...infer.map((r) => r.job)].some((j) => !FINAL.includes(j.state));
  }

  /* Rounds side by side: a chain starts at a model no student run made (the first teacher); a
     student run whose teacher is round k's model is round k + 1. One row per chain's last model,
     each cell that round's AP on the chain's validation set (the last student's). */
  function renderRounds(runs, ckpts, evals, kind) {
    const madeBy = new Map();  // checkpoint id -> the training run that wrote it
    for (const r of runs) if (r.checkpoint) madeBy.set(r.checkpoint, r);
    const students = runs.filter((r) => r.role === "student" && r.teacher && r.checkpoint);
    const parentOf = (ck) => { const r = madeBy.get(ck); return r && r.role === "student" ? r.teacher : null; };
    const hasChild = new Set(students.map((r) => r.teacher));
    const leaves = students.filter((r) => !hasChild.has(r.checkpoint));
    const chains = leaves.map((leaf) => {
      const chain = [leaf.checkpoint];
      for (let ck = parentOf(leaf.checkpoint); ck != null && chain.length < 50 && !chain.includes(ck); ck = parentOf(ck)) chain.unshift(ck);
      return {chain, validation: leaf.validation};
    }).sort((a, b) => b.chain.length - a.chain.length || a.chain[0] - b.chain[0]);
    const box = document.getElementById("rounds-box");
    box.hidden = !chains.length;
    if (!chains.length) return;
    const width = Math.max(...chains.map((c) => c.chain.length));
    const name = (id) => { const c = ckpts.find((k) => k.id === id); return c ? c.name : `model ${id}`; };
    const apOf = (ck, ds) => {
      const e = evals.find((x) => x.checkpoint === ck && (ds == null || x.dataset === ds));
      return e && e.stats[kind] && e.stats[kind].AP != null ? e.stats[kind].AP : null;
    };
    document.getElementById("rounds-note").textContent = `${kind === "keypoints" ? "keypoint" : "box"} AP on the validation set`;
    document.querySelector("#rounds thead").replaceChildren(h("tr", {},
      ...Array.from({length: width}, (_, i) => h("th", {}, i === 0 ? "Teacher" : `Student round ${i}`))));
    document.querySelector("#rounds tbody").replaceChildren(...chains.map(({chain, validation}) => h("tr", {"data-chain": chain.join(",")},
      ...Array.from({length: width}, (_, i) => {
        if (i >= chain.length) return h("td", {});
        const ap = apOf(chain[i], validation), prev = i ? apOf(chain[i - 1], validation) : null;
        const d = ap != null && prev != null ? ap - prev : null;
        const run = madeBy.get(chain[i]);
        return h("td", {"data-round": i, "data-checkpoint": chain[i], "data-ap": ap != null ? ap.toFixed(2) : ""},
          run ? h("a", {href: `/training/${run.id}/`}, name(chain[i])) : name(chain[i]), h("br", {}),
          h("b", {class: "ap"}, ap != null ? ap.toFixed(2) : "–"),
          d != null ? h("span", {class: "small " + (d >= 0 ? "gain" : "loss")}, ` ${d >= 0 ? "+" : "−"}${Math.abs(d).toFixed(2)}`) : "");
      }))));
  }

  async function refresh() {
    try {
      const [p] = await Promise.all([api(`/api/projects/${PID}/pipeline/`), renderDatasets()]);
      renderSteps(p);
      const busy = await renderRuns();
      app.dataset.ready = "1";  // everything drawn: steps, datasets, runs, evaluations
      clearTimeout(refresh._t);
      refresh._t = setTimeout(refresh, busy ? 1500 : 10000);
    } catch (e) { fail(e); }
  }

  document.getElementById("new-dataset").addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    try { await api("/api/datasets/", {method: "POST", body: {project: PID, name: f.get("name"), role: f.get("role")}}); e.target.reset(); refresh(); }
    catch (err) { fail(err); }
  });

  /* Iterations empty = "auto" (null): the worker sizes the bound from the data and its device
     and, with a validation set, training stops when validation AP converges after the first decay. A number
     overrides it (with a warm-up sized to it). */
  function trainConfig(iterations, rest) {
    const n = String(iterations ?? "").trim() === "" ? null : +iterations;
    return {...rest, iterations: n, ...(n ? {warmup_iters: Math.min(100, Math.max(1, Math.floor(n / 4)))} : {})};
  }
  const teacherVal = document.querySelector("#teacher-form select[name=validation]");
  const showNoValNote = () => (document.querySelector("#teacher-form .no-val-note").hidden = !!teacherVal.value);
  teacherVal.addEventListener("change", showNoValNote);

  document.getElementById("teacher-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const btn = e.submitter; btn.disabled = true;
    const f = new FormData(e.target);
    try {
      const run = await api("/api/training-runs/", {method: "POST", body: {
        project: PID, arch: f.get("arch"), labeled: +f.get("labeled"), validation: f.get("validation") ? +f.get("validation") : null,
        min_size: f.get("min_size") ? +f.get("min_size") : null, request_key: crypto.randomUUID(),
        config: trainConfig(f.get("iterations"), {batch_size: +f.get("batch_size"), lr: +f.get("lr"), checkpoint_every: 50})}});
      location.href = `/training/${run.id}/`;
    } catch (err) { fail(err); btn.disabled = false; }
  });

  document.getElementById("ckpt-upload").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = new FormData(e.target); form.append("project", PID); form.append("role", "teacher");
    try { await Distill.upload("/api/models/upload/", form); toast("checkpoint imported"); refresh(); } catch (err) { fail(err); }
  });

  /* The views' default scales follow the teacher's training size, as the paper's do (Detectron
     trains at 800 and tests at 400..1200): 2/3, 1, 4/3 and 5/3 of it, multiples of 16, until the
     user types their own. */
  let checkpoints = [];
  const scalesInput = document.querySelector('#infer-form [name="scales"]');
  scalesInput.addEventListener("input", () => (scalesInput.dataset.touched = "1"));
  function suggestScales() {
    const c = checkpoints.find((k) => String(k.id) === document.getElementById("ckpt-select").value);
    const s = c && c.meta && c.meta.min_size;
    if (!s || scalesInput.dataset.touched) return;
    scalesInput.value = [2 / 3, 1, 4 / 3, 5 / 3].map((f) => Math.max(32, Math.round((s * f) / 16) * 16)).join(",");
  }
  document.getElementById("ckpt-select").addEventListener("change", suggestScales);

  document.getElementById("infer-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const btn = e.submitter; btn.disabled = true;
    const f = new FormData(e.target);
    try {
      await api("/api/inference-runs/", {method: "POST", body: {
        project: PID, checkpoint: +f.get("checkpoint"), dataset: +f.get("dataset"),
        ensemble_with: f.get("ensemble_with") ? +f.get("ensemble_with") : null,
        validation: f.get("validation") ? +f.get("validation") : null,
        transforms: {scales: f.get("scales").split(",").map((s) => parseInt(s, 10)), flip: f.get("flip") === "on", max_size: 4000},
        options: {method: f.get("method"), ...(TASK === "keypoints" ? {keypoint_scales: f.get("keypoint_scales"), keypoint_size_dependence: f.get("size_dependence") === "on"} : {})}}});
      toast("inference started"); refresh();
    } catch (err) { fail(err); }
    btn.disabled = false;
  });

  refresh();
})();
