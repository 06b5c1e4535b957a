"""Issue 11, the product around the recipe: the training page draws validation AP over iterations
beside the loss (best point marked, why it stopped); the student page shows the teacher's AP from
the start, the difference when it finishes, and the pseudo-label set and inference run that fed it."""
import pytest

from tests.app.conftest import TINY_TRAIN
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_validation_ap_curve_and_the_student_against_its_teacher(page, live_server, ready_run, as_alice):
    teacher = as_alice.get(f"/api/models/{ready_run['teacher']}/").json()
    trun = as_alice.get(f"/api/training-runs/{teacher['training_run']}/").json()
    v = trun["job"]["result"]["validation"]
    page.goto(f"{live_server.url}/training/{trun['id']}/")
    page.wait_for_selector("#training[data-state='succeeded']")
    page.wait_for_function("(n) => +document.getElementById('training').dataset.valPoints === n", arg=len(v["history"]))
    assert len(v["history"]) >= 1
    drawn = page.evaluate("Chart.getChart('loss').data.datasets.map(d => d.data.length)")
    assert drawn == [len(trun["history"]), len(v["history"]), 1 if v["best"] else 0]
    assert page.evaluate("Chart.getChart('loss').options.scales.y1.display") is True
    if v["best"]:
        assert page.get_attribute("#training", "data-best") == str(v["best"]["iteration"])
    assert v["stopped"] and v["stopped"] in page.inner_text("#val-status")

    # a student: its teacher's AP is on the page before it finishes; the difference after
    pls = as_alice.post("/api/pseudo-label-sets/", {"run": ready_run["run"], "thresholds": {"default": 0.05}}, format="json").json()
    pls = wait_for(lambda: (x := as_alice.get(f"/api/pseudo-label-sets/{pls['id']}/").json())["job"]["state"] == "succeeded" and x,
                   what="pseudo-labels")
    r = as_alice.post("/api/training-runs/", {"project": ready_run["project"], "arch": "fasterrcnn_tiny", "labeled": ready_run["labeled"],
                                              "validation": ready_run["validation"], "pseudo_label_set": pls["id"],
                                              "config": {**TINY_TRAIN, "iterations": 6, "batch_size": 2}}, format="json").json()
    teacher_ap = next(e for e in as_alice.get(f"/api/evaluations/?project={ready_run['project']}").json()["results"]
                      if e["checkpoint"] == ready_run["teacher"] and e["dataset"] == ready_run["validation"])["stats"]["bbox"]["AP"]
    page.goto(f"{live_server.url}/training/{r['id']}/")
    page.wait_for_selector("#teacher-ap-value")
    assert page.inner_text("#teacher-ap-value") == f"{teacher_ap:.2f}"
    assert page.get_attribute("#link-pls", "href") == f"/api/pseudo-label-sets/{pls['id']}/export/"
    assert page.get_attribute("#link-run", "href") == f"/runs/{ready_run['run']}/review/"
    page.wait_for_selector("#training[data-state='succeeded']", timeout=300000)
    page.wait_for_selector("#ap-diff-value")
    student = as_alice.get(f"/api/training-runs/{r['id']}/").json()
    student_ap = next(e for e in as_alice.get(f"/api/evaluations/?project={ready_run['project']}").json()["results"]
                      if e["checkpoint"] == student["checkpoint"])["stats"]["bbox"]["AP"]
    d = student_ap - teacher_ap
    assert page.inner_text("#ap-diff-value") == f"{'+' if d >= 0 else '−'}{abs(d):.2f} AP"
    if d < 0:  # below its teacher: the page says what the data shows
        assert "ratio" in page.inner_text("#why")
