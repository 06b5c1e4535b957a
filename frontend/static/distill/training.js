/* A training run, live: state, progress and time left, loss curve, then teacher vs student AP. */
"use strict";
(() => {
  const {api, h, fail, toast, progressBar, fmtSeconds} = Distill;
  const root = document.getElementById("training");
  const RUN = +root.dataset.run, PID = +root.dataset.project, KIND = root.dataset.task === "keypoints" ? "keypoints" : "bbox";
  const $ = (id) => document.getElementById(id);
  let lossChart = null, apChart = null, shownConfig = false;
  const FINAL = ["succeeded", "failed", "cancelled"];

  function eta(run) {
    const hist = run.history;
    if (!hist.length || run.job.state !== "running") return null;
    const last = hist[hist.length - 1], total = run.config.iterations;
    return last.iteration ? (last.time / last.iteration) * (total - last.iteration) : null;
  }

  function renderLoss(history) {
    const pts = history.map((p) => ({x: p.iteration, y: p.loss}));
    if (lossChart) { lossChart.data.datasets[0].data = pts; lossChart.update("none"); return; }
    lossChart = new Chart($("loss"), {type: "line", data: {datasets: [{label: "total loss", data: pts, borderColor: "#4363d8", pointRadius: 0, tension: 0.2}]},
      options: {animation: false, parsing: false, responsive: true, maintainAspectRatio: false,
        scales: {x: {type: "linear", title: {display: true, text: "iteration"}}, y: {beginAtZero: true}}}});
  }

  async function renderAP(run) {
    if (!run.checkpoint || !run.validation) return;
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
  }

  async function tick() {
    try {
      const run = await api(`/api/training-runs/${RUN}/`);
      const j = run.job;
      $("state").textContent = j.state; $("state").className = "badge " + j.state;
      const left = eta(run);
      $("progress").replaceChildren(progressBar(j.progress, `${Math.round(j.progress * 100)}%` + (left != null ? ` · about ${fmtSeconds(left)} left` : "")));
      $("message").textContent = j.message || "";
      $("error").textContent = j.error || "";
      $("cancel").hidden = FINAL.includes(j.state);
      $("retry").hidden = !["failed", "cancelled"].includes(j.state);
      if (!shownConfig) {
        shownConfig = true;
        const items = {architecture: run.arch, init: run.role === "student" ? run.init : "—", iterations: run.config.iterations,
          "batch size": run.config.batch_size, "labeled:pseudo": run.role === "student" ? run.config.ratio : "labeled only",
          "learning rate": run.config.lr, "decay at": run.config.steps.map((s) => Math.round(s * 100) + "%").join(", ")};
        $("config").replaceChildren(...Object.entries(items).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
      }
      renderLoss(run.history);
      if (j.state === "succeeded") await renderAP(run);
      root.dataset.state = j.state; root.dataset.progress = j.progress;
      if (!FINAL.includes(j.state)) setTimeout(tick, 1000);
    } catch (e) { fail(e); setTimeout(tick, 5000); }
  }
  $("cancel").onclick = async () => { try { await api(`/api/training-runs/${RUN}/cancel/`, {method: "POST"}); toast("cancelling"); } catch (e) { fail(e); } };
  $("retry").onclick = async () => { try { await api(`/api/training-runs/${RUN}/retry/`, {method: "POST"}); tick(); } catch (e) { fail(e); } };
  tick();
})();
