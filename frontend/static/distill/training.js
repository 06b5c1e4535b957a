/* A training run, live: state, progress and time left, loss and validation AP curves, then
   teacher vs student AP. A student's page shows its teacher's AP from the start, the difference
   when it finishes, and the pseudo-label set and inference run that fed it. */
"use strict";
(() => {
  const {api, h, fail, toast, progressBar, fmtSeconds, jobText, confirmDialog} = Distill;
  const root = document.getElementById("training");
  const RUN = +root.dataset.run, PID = +root.dataset.project, KIND = root.dataset.task === "keypoints" ? "keypoints" : "bbox";
  const $ = (id) => document.getElementById(id);
  let lossChart = null, apChart = null, shownConfig = "", sawAuto = false, teacherInfo = null, fedBy = false;
  const FINAL = ["succeeded", "failed", "cancelled"];

  function eta(run) {
    const hist = run.history;
    if (!hist.length || run.job.state !== "running") return null;
    const last = hist[hist.length - 1], total = run.config.iterations;
    return last.iteration && total ? (last.time / last.iteration) * (total - last.iteration) : null;
  }

  /* The loss (left axis) and the validation AP (right axis, best point starred), on one x axis. */
  function renderCurves(run) {
    const pts = run.history.map((p) => ({x: p.iteration, y: p.loss}));
    const v = (run.job.result || {}).validation || null;
    const vpts = v ? v.history.map((p) => ({x: p.iteration, y: p.AP})) : [];
    const best = v && v.best ? [{x: v.best.iteration, y: v.best.AP}] : [];
    const datasets = [
      {label: "total loss", data: pts, borderColor: "#4363d8", pointRadius: 0, tension: 0.2, yAxisID: "y"},
      {label: `validation ${KIND === "keypoints" ? "keypoint" : "box"} AP`, data: vpts, borderColor: "#3cb44b", backgroundColor: "#3cb44b",
        pointRadius: 3, yAxisID: "y1"},
      {label: "best (kept)", data: best, borderColor: "#d68910", backgroundColor: "#f5b041", pointStyle: "star", pointRadius: 9,
        showLine: false, yAxisID: "y1"}];
    if (lossChart) {
      lossChart.data.datasets.forEach((d, i) => (d.data = datasets[i].data));
      lossChart.options.scales.y1.display = !!vpts.length;
      lossChart.update("none");
    } else {
      lossChart = new Chart($("loss"), {type: "line", data: {datasets},
        options: {animation: false, parsing: false, responsive: true, maintainAspectRatio: false,
          scales: {x: {type: "linear", title: {display: true, text: "iteration"}},
            y: {beginAtZero: true, title: {display: true, text: "loss"}},
            y1: {position: "right", beginAtZero: true, display: !!vpts.length, grid: {drawOnChartArea: false},
              title: {display: true, text: "validation AP (%)"}}}}});
    }
    root.dataset.valPoints = vpts.length;
    root.dataset.best = best.length ? best[0].x : "";
    let text = "";
    if (!run.validation) text = "No validation set: AP is not tracked during training (add one on the project page).";
    else if (v) {
      const parts = [];
      if (v.best) parts.push(`best validation AP ${v.best.AP.toFixed(2)} at iteration ${v.best.iteration} (its weights are the ones kept)`);
      if (v.last_AP != null && v.history.length) parts.push(`last ${v.last_AP.toFixed(2)}`);
      if (v.drops) parts.push(`${v.drops} learning-rate drop${v.drops > 1 ? "s" : ""}`);
      if (v.eval_every) parts.push(`evaluated every ${v.eval_every} iterations`);
      text = parts.join(" · ");
      if (FINAL.includes(run.job.state) && v.stopped) text += `. Stopped: ${v.stopped}`;
    } else if (!FINAL.includes(run.job.state)) text = "Validation AP appears here after the first evaluation.";
    $("val-status").textContent = text;
    $("val-status").dataset.stopped = v && FINAL.includes(run.job.state) ? v.stopped || "" : "";
  }

  async function evalOf(checkpoint, dataset) {
    const evals = (await api(`/api/evaluations/?project=${PID}&dataset=${dataset}&page_size=200`)).results;
    return evals.find((e) => e.checkpoint === checkpoint && e.job.state === "succeeded") || null;
  }

  async function renderAP(run) {
    if (!run.checkpoint || !run.validation) return null;
    const ids = [run.checkpoint, run.teacher].filter(Boolean);
    const evals = (await api(`/api/evaluations/?project=${PID}&dataset=${run.validation}&page_size=200`)).results
      .filter((e) => ids.includes(e.checkpoint) && e.job.state === "succeeded");
    const rows = ids.map((id) => ({id, e: evals.find((x) => x.checkpoint === id)})).filter((r) => r.e);
    const name = (id) => (id === run.checkpoint ? `${run.role} (this run)` : "teacher");
    const keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"];
    $("ap-table").querySelector("tbody").replaceChildren(...rows.map((r) => h("tr", {"data-model": name(r.id)}, h("td", {}, name(r.id)),
      ...keys.map((k) => h("td", {}, r.e.stats[KIND] && r.e.stats[KIND][k] != null && r.e.stats[KIND][k] >= 0 ? r.e.stats[KIND][k].toFixed(2) : "–")))));
    const data = {labels: ["AP", "AP50", "AP75"], datasets: rows.map((r, i) => ({label: name(r.id), data: ["AP", "AP50", "AP75"].map((k) => (r.e.stats[KIND] || {})[k] || 0),
      backgroundColor: i === 0 ? "#3cb44b" : "#aaa"}))};
    if (apChart) { apChart.data = data; apChart.update("none"); }
    else apChart = new Chart($("ap"), {type: "bar", data, options: {animation: false, responsive: true, maintainAspectRatio: false, scales: {y: {beginAtZero: true, title: {display: true, text: KIND + " AP (%)"}}}}});
    const mine = rows.find((r) => r.id === run.checkpoint);
    return mine ? (mine.e.stats[KIND] || {}).AP : null;
  }

  /* The teacher's AP, from the start: its evaluation on this validation set, else the best
     validation AP its own training tracked on that set. */
  async function teacherAP(run) {
    if (teacherInfo) return teacherInfo;
    const info = {ap: null, source: "", run: null};
    if (run.validation) {
      const e = await evalOf(run.teacher, run.validation);
      if (e && e.stats[KIND]) { info.ap = e.stats[KIND].AP; info.source = "evaluated on this validation set"; }
    }
    const ckpt = await api(`/api/models/${run.teacher}/`);
    if (ckpt.training_run) {
      info.run = await api(`/api/training-runs/${ckpt.training_run}/`).catch(() => null);
      const v = info.run && (info.run.job.result || {}).validation;
      if (info.ap == null && v && v.best && info.run.validation === run.validation) {
        info.ap = v.best.AP; info.source = `best validation AP of teacher run #${info.run.id}`;
      }
    }
    info.name = ckpt.name;
    if (info.ap != null || !run.validation) teacherInfo = info;
    return info;
  }

  async function renderCompare(run, studentAP) {
    if (run.role !== "student" || !run.teacher) return;
    const t = await teacherAP(run);
    const tp = $("teacher-ap");
    tp.replaceChildren("Teacher ", t.run ? h("a", {href: `/training/${t.run.id}/`}, t.name) : t.name, ": ",
      t.ap != null ? h("b", {id: "teacher-ap-value"}, t.ap.toFixed(2)) : "no AP on this validation set yet",
      t.ap != null ? ` ${KIND} AP (${t.source})` : "");
    tp.classList.toggle("muted", t.ap == null);
    root.dataset.teacherAp = t.ap ?? "";
    if (!fedBy && run.pseudo_label_set) {
      fedBy = true;
      const pls = await api(`/api/pseudo-label-sets/${run.pseudo_label_set}/`);
      const th = Object.entries(pls.thresholds).map(([k, v]) => `${k}: ${(+v).toFixed(3)}`).join(", ");
      const c = pls.counts || {};
      $("fed-by").replaceChildren("Trained on ",
        h("a", {id: "link-pls", href: `/api/pseudo-label-sets/${pls.id}/export/`}, `pseudo-label set #${pls.id}`),
        ` (${c.images ?? "?"} images, ${c.instances ?? "?"} instances; thresholds ${th}`,
        c.keypoints_hidden ? h("span", {id: "kp-hidden"}, `; ${c.keypoints_hidden} keypoints scored below ${(+c.keypoint_threshold).toFixed(2)} left unlabeled`) : "",
        ") from ",
        h("a", {id: "link-run", href: `/runs/${pls.run}/review/`}, `inference run #${pls.run}`),
        `, mixed labeled:pseudo ${run.config.ratio}.`);
      root._pls = pls;
    }
    if (studentAP == null || t.ap == null) return;
    const d = studentAP - t.ap;
    $("ap-diff").replaceChildren("Student ", h("b", {}, studentAP.toFixed(2)), " AP: ",
      h("span", {id: "ap-diff-value", class: d >= 0 ? "gain" : "loss"}, `${d >= 0 ? "+" : "−"}${Math.abs(d).toFixed(2)} AP`), " against its teacher.");
    root.dataset.apDiff = d.toFixed(2);
    if (d < 0) await explain(run, t);
  }

  /* A student below its teacher: what the data shows. */
  async function explain(run, t) {
    const why = [];
    const v = t.run && (t.run.job.result || {}).validation;
    if (v && v.history && v.history.length >= 2) {
      const h_ = v.history, last = h_[h_.length - 1], prev = h_[h_.length - 2];
      if (v.best && v.best.iteration === last.iteration && last.AP > prev.AP)
        why.push(`The teacher's validation AP was still rising at the end of its schedule (${prev.AP.toFixed(1)} → ${last.AP.toFixed(1)}): a longer teacher schedule comes first.`);
    }
    const pls = root._pls;
    if (pls) {
      const st = await api(`/api/inference-runs/${pls.run}/threshold-stats/?thresholds=${encodeURIComponent(JSON.stringify(pls.thresholds))}`).catch(() => null);
      if (st && st.current && st.current.precision != null)
        why.push(`Pseudo-label precision on validation at the chosen thresholds: ${(st.current.precision * 100).toFixed(1)}%, recall ${(st.current.recall * 100).toFixed(1)}%.`);
    }
    why.push(`Labeled:pseudo ratio ${run.config.ratio} over ${run.config.iterations} iterations.`);
    $("why").replaceChildren(...why.map((w) => h("li", {}, w)));
  }

  async function tick() {
    try {
      const run = await api(`/api/training-runs/${RUN}/`);
      const j = run.job;
      $("state").textContent = j.state === "succeeded" ? "done" : j.state; $("state").className = "badge " + j.state;
      const left = eta(run);
      $("progress").replaceChildren(progressBar(j.progress, `${Math.round(j.progress * 100)}%` + (left != null ? ` · about ${fmtSeconds(left)} left` : "")));
      // once final, the outcome: never the last message of a step that is over
      $("message").textContent = FINAL.includes(j.state) ? jobText(j) : (j.message || "");
      $("error").textContent = j.error || "";
      $("cancel").hidden = FINAL.includes(j.state);
      $("retry").hidden = !["failed", "cancelled"].includes(j.state);
      // the config is redrawn while it changes: iterations "auto" (null) until the worker sizes it
      if (shownConfig !== JSON.stringify(run.config)) {
        shownConfig = JSON.stringify(run.config);
        const c = run.config;
        if (c.iterations == null) sawAuto = true;
        const iters = c.iterations == null ? "auto (sized by the worker when it starts)"
          : sawAuto ? `${c.iterations} (auto: sized from the data and the device)` : c.iterations;
        root.dataset.iterations = c.iterations ?? "auto";
        const items = {architecture: run.arch, init: run.role === "student" ? run.init : "—", iterations: iters,
          "batch size": c.batch_size, "labeled:pseudo": run.role === "student" ? c.ratio : "labeled only",
          "learning rate": c.lr,
          "training sizes": c.train_scales == null ? "set by the worker when it starts"
            : c.train_scales.length === 1 && c.train_scales[0] === 1 ? "the model's size"
            : `${c.train_scales.join(", ")} × the model's size, one drawn per image`,
          schedule: c.schedule || "steps",
          ...(c.schedule === "plateau" || (c.schedule === "auto" && run.validation) ? {patience: c.patience, "evaluate every": c.eval_every || "auto"}
            : {}),
          "decay at": c.schedule === "plateau" && run.validation ? "on a plateau (70%, 90% at the latest)"
            : c.schedule === "auto" && run.validation ? `${Math.round((c.steps || [0.7])[0] * 100)}%, then on a plateau (90% at the latest)`
            : (c.steps || []).map((s) => Math.round(s * 100) + "%").join(", ")};
        $("config").replaceChildren(...Object.entries(items).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {"data-key": k}, String(v))]));
      }
      renderCurves(run);
      const ap = j.state === "succeeded" ? await renderAP(run) : null;
      await renderCompare(run, ap).catch(fail);
      renderAgain(run);
      root.dataset.state = j.state; root.dataset.progress = j.progress;
      if (!FINAL.includes(j.state)) setTimeout(tick, 1000);
    } catch (e) { fail(e); setTimeout(tick, 5000); }
  }
  /* Rounds: a finished student becomes the next round's teacher. "Distill again" starts an
     inference run of this student's checkpoint on the same unlabeled set, with the transforms and
     options of the inference run that fed it (its pseudo-label set's run), by default ensembled with
     the model that taught it (that run's checkpoint). */
  function renderAgain(run) {
    const box = $("again");
    if (!box) return;
    box.hidden = !(run.role === "student" && run.job.state === "succeeded" && run.checkpoint && run.pseudo_label_set);
  }
  async function distillAgain() {
    const btn = $("distill-again");
    if (btn.disabled) return;
    btn.disabled = true;
    try {
      const run = await api(`/api/training-runs/${RUN}/`);
      const pls = await api(`/api/pseudo-label-sets/${run.pseudo_label_set}/`);
      const prev = await api(`/api/inference-runs/${pls.run}/`);
      const next = await api("/api/inference-runs/", {method: "POST", body: {
        project: PID, checkpoint: run.checkpoint, dataset: prev.dataset, validation: prev.validation,
        ensemble_with: $("again-with").checked ? prev.checkpoint : null,
        transforms: prev.transforms, options: prev.options, chunk_size: prev.chunk_size}});
      root.dataset.nextRun = next.id;
      location.href = `/projects/${PID}/?inference=${next.id}#infer-card`;
    } catch (e) { fail(e); btn.disabled = false; }
  }
  if ($("distill-again")) $("distill-again").onclick = distillAgain;

  $("cancel").onclick = async () => {
    if (!(await confirmDialog("Cancel this training? The last checkpoint is kept; retry resumes from it.", {ok: "Cancel training", cancel: "Keep training", danger: true}))) return;
    try { await api(`/api/training-runs/${RUN}/cancel/`, {method: "POST"}); toast("cancelling"); } catch (e) { fail(e); }
  };
  $("retry").onclick = async () => { try { await api(`/api/training-runs/${RUN}/retry/`, {method: "POST"}); tick(); } catch (e) { fail(e); } };
  tick();
})();
