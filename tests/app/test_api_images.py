def test_list_and_fetch_images(as_alice, det_project):
    r = as_alice.get(f"/api/images/?dataset={det_project['labeled']}").json()
    assert r["count"] == 6 and r["results"][0]["annotations"]
    img = r["results"][0]
    assert as_alice.get(img["url"]).status_code == 200
    assert as_alice.get(img["thumbnail_url"]).status_code == 200


def test_delete_image(as_alice, det_project):
    img = as_alice.get(f"/api/images/?dataset={det_project['unlabeled']}").json()["results"][0]
    assert as_alice.delete(f"/api/images/{img['id']}/").status_code == 204
    assert as_alice.get(f"/api/images/{img['id']}/").status_code == 404
