def test_evaluate_a_checkpoint_on_a_labeled_split(as_alice, det_project, teacher):
    r = as_alice.post("/api/evaluations/", {"checkpoint": teacher["checkpoint"], "dataset": det_project["labeled"]}, format="json")
    assert r.status_code == 201
    ev = as_alice.get(f"/api/evaluations/{r.json()['id']}/").json()
    assert ev["job"]["state"] == "succeeded" and len(ev["stats"]["bbox"]) == 12


def test_unlabeled_sets_cannot_be_evaluated(as_alice, det_project, teacher):
    r = as_alice.post("/api/evaluations/", {"checkpoint": teacher["checkpoint"], "dataset": det_project["unlabeled"]}, format="json")
    assert r.status_code == 400
