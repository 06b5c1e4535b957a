"use strict";
(() => {
  const {api, h, fail} = Distill;
  async function load() {
    const tbody = document.querySelector("#projects tbody");
    const data = await api("/api/projects/?page_size=200");
    tbody.replaceChildren(...data.results.map((p) => h("tr", {},
      h("td", {}, h("a", {href: `/projects/${p.id}/`}, p.name)), h("td", {}, p.task),
      h("td", {}, p.categories.map((c) => c.name).join(", ") || "—"), h("td", {}, new Date(p.created).toLocaleString()))));
    if (!data.results.length) tbody.append(h("tr", {}, h("td", {colspan: 4, class: "muted"}, "No projects yet.")));
  }
  document.getElementById("new-project").addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    try {
      const p = await api("/api/projects/", {method: "POST", body: {name: f.get("name"), task: f.get("task")}});
      location.href = `/projects/${p.id}/`;
    } catch (err) { fail(err); }
  });
  load().catch(fail);
})();
