"""`main.py profiles` against an OpenAI-compatible server on 127.0.0.1 (tests/openai_stub.py):
the real `openai` client, retries on 429 / 5xx / timeouts, a malformed answer, resuming, the
key kept out of logs, and a `run` that uses the written profiles."""
import json
import socket
from pathlib import Path

from click.testing import CliRunner

from dataHandler import load_dataset
from main import cli
from model.llm_profiles import ProfileFile
from openai_stub import StubLLM

KEY = "sk-test-do-not-log-7f3a"


def _profiles(folder, stub_url: str, *extra: str):
    args = ["profiles", "--dataset", str(folder), "--users", "--llm-url", stub_url,
            "--llm-model", "stub-model", "--api-key-env", "STUB_LLM_KEY", "--timeout", "0.3",
            "--retries", "3", "--concurrency", "2", *extra]
    return CliRunner().invoke(cli, args, env={"STUB_LLM_KEY": KEY}, catch_exceptions=False)


def test_profiles_written_through_the_openai_client_resume_and_feed_a_run(easyrec_folder,
                                                                          tmp_path):
    original = (easyrec_folder / "user_profile.json").read_text()
    # users 0 and 3 lack a written profile and have training items with text
    with StubLLM(KEY, faults=["429", "500", "slow"], malformed_at=2) as stub:
        first = _profiles(easyrec_folder, stub.url)
        assert first.exit_code == 0, first.output
        report = json.loads((easyrec_folder / "user_profile.llm.report.json").read_text())
        assert (report["asked"], report["written"]) == (2, 1)
        assert report["failed"] == {"malformed_answer": 1}
        assert report["retries"] >= 3  # the 429, the 500 and the slow reply were retried
        assert (report["prompt_tokens"], report["completion_tokens"]) == (100, 20)
        assert report["cost_usd"] is None and "cost: n/a" in first.output

        second = _profiles(easyrec_folder, stub.url, "--price-input", "1", "--price-output", "2")
        assert second.exit_code == 0, second.output
        report = json.loads((easyrec_folder / "user_profile.llm.report.json").read_text())
        assert (report["asked"], report["written"], report["failed"]) == (1, 1, {})
        assert report["cost_usd"] == (100 * 1 + 20 * 2) / 1e6
        # nothing left to write: no request is sent
        asked_before = len(stub.prompts)
        assert "0 of 0 profiles" in _profiles(easyrec_folder, stub.url).output
        assert len(stub.prompts) == asked_before

    assert not any("VALIDATION-ONLY" in p for p in stub.prompts)  # train items only
    assert all(KEY not in text for text in (first.output, second.output,
                                            (easyrec_folder / "user_profile.llm.report.json")
                                            .read_text()))
    assert (easyrec_folder / "user_profile.json").read_text() == original  # never changed
    records = [json.loads(line) for line in
               (easyrec_folder / "user_profile.llm.json").read_text().splitlines()]
    assert sorted(r["user_id"] for r in records) == [0, 3]
    written = records
    assert all(r["template"] == "user_profile.txt" and r["model"] == "stub-model"
               and len(r["template_sha256"]) == 16 for r in written)
    assert all("[EMAIL]" in r["profile"] and "@" not in r["profile"] for r in written)
    assert not (easyrec_folder / "user_profile.llm.json.partial").exists()

    dataset = load_dataset(easyrec_folder)
    assert list(dataset.user_profile_source) == ["written", "written", "none", "written"]
    result = CliRunner().invoke(cli, ["run", "--dataset", str(easyrec_folder), "--model",
                                      "tfidf", "--runs-dir", str(tmp_path / "runs")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    line = [l for l in result.output.splitlines() if l.startswith("run written to ")][-1]
    metrics = json.loads((Path(line.removeprefix("run written to ")) / "metrics.json")
                         .read_text())
    assert metrics["dataset"]["text_coverage"]["users"]["written"] == 3


def test_dry_run_sends_nothing_and_estimates_tokens(easyrec_folder):
    with StubLLM(KEY) as stub:
        result = _profiles(easyrec_folder, stub.url, "--dry-run")
    assert result.exit_code == 0, result.output
    assert stub.prompts == []
    assert "dry run: 2 prompts" in result.output and "[user] Businesses" in result.output
    assert not (easyrec_folder / "user_profile.llm.report.json").exists()


def test_an_unreachable_server_is_reported_not_a_traceback(easyrec_folder):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    result = _profiles(easyrec_folder, url, "--retries", "0")
    assert result.exit_code == 0, result.output
    assert "failed: connection: 2" in result.output and "run again" in result.output
    assert not (easyrec_folder / "user_profile.llm.json").exists()


def test_a_journal_cut_by_a_crash_is_merged_without_its_broken_line(tmp_path):
    path = tmp_path / "user_profile.llm.json"
    path.write_text('{"user_id": 1, "profile": "Likes coffee."}')  # no final newline
    journal = tmp_path / "user_profile.llm.json.partial"
    journal.write_text('{"user_id": 4, "profile": "Enjoys tacos and beer."}\n'
                       '{"user_id": 1, "profile": "a duplicate of an existing id"}\n'
                       '{"user_id": 7, "prof')  # the process died mid-line
    profiles = ProfileFile(path, "user_id")
    assert profiles.ids() == {1, 4}
    assert profiles.commit() == 1
    assert path.read_text().splitlines() == ['{"user_id": 1, "profile": "Likes coffee."}',
                                             '{"user_id": 4, "profile": "Enjoys tacos and beer."}']
    assert not journal.exists()


def test_bad_settings_and_templates_are_one_line_errors(easyrec_folder, tmp_path):
    result = _profiles(easyrec_folder, "http://127.0.0.1:9/v1", "--concurrency", "0")
    assert result.exit_code != 0 and "--concurrency must be at least 1" in result.output
    result = _profiles(easyrec_folder, "http://127.0.0.1:9/v1", "--api-key-env", KEY)
    assert result.exit_code != 0 and "not the key itself" in result.output
    assert KEY not in result.output  # not echoed back
    with ProfileFile(easyrec_folder / "user_profile.llm.json", "user_id").locked():
        busy = _profiles(easyrec_folder, "http://127.0.0.1:9/v1")
    assert busy.exit_code != 0 and "another `profiles` run is writing it" in busy.output
    template = tmp_path / "t.txt"
    template.write_text("no separator here ${history}")
    result = _profiles(easyrec_folder, "http://127.0.0.1:9/v1", "--template", str(template))
    assert result.exit_code != 0 and "a line '---'" in result.output
    template.write_text("system\n---\nuser ${unknown}")
    result = _profiles(easyrec_folder, "http://127.0.0.1:9/v1", "--template", str(template))
    assert result.exit_code != 0 and "placeholder" in result.output


def test_item_profiles_come_from_metadata_and_reviews(easyrec_folder, tmp_path):
    (easyrec_folder / "item_meta.json").write_text(json.dumps(
        {"item_id": 3, "name": "Gym One", "categories": "Fitness", "city": "Tucson"}) + "\n")
    reviews = tmp_path / "reviews.json"
    reviews.write_text(json.dumps({"item_id": 3, "review": "Great trainers, call 520-555-0199",
                                   "user_id": 2}) + "\n"  # user 2 trains on item 3
                       + json.dumps({"item_id": 3, "review": "TEST-PAIR review",
                                     "user_id": 0}) + "\n")  # user 0 has item 3 in test only
    with StubLLM(KEY) as stub:
        result = CliRunner().invoke(cli, [
            "profiles", "--dataset", str(easyrec_folder), "--items", "--llm-url", stub.url,
            "--llm-model", "m", "--api-key-env", "STUB_LLM_KEY", "--reviews", str(reviews)],
            env={"STUB_LLM_KEY": KEY}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(stub.prompts) == 1  # item 3 is the only item with no written profile
    assert '"Gym One"' in stub.prompts[0] and "Great trainers, call [PHONE]" in stub.prompts[0]
    assert "TEST-PAIR" not in stub.prompts[0]  # a review of a held-out pair would leak it
    dataset = load_dataset(easyrec_folder)
    assert dataset.item_profile_source[3] == "written"
    assert "item_profile.txt" in (easyrec_folder / "item_profile.llm.json").read_text()


def test_retries_of_requests_that_fail_in_the_end_are_counted(easyrec_folder):
    with socket.socket() as probe:  # a port nobody listens on: about 0.5 s of backoff
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    result = _profiles(easyrec_folder, url, "--retries", "1")
    assert "failed: connection: 2; retries: 2;" in result.output, result.output
    with StubLLM(KEY, faults=["429"] * 6) as stub:  # 3 attempts per user, each a 429
        result = _profiles(easyrec_folder, stub.url, "--retries", "2")
    assert "failed: rate_limited: 2; retries: 4;" in result.output, result.output
    assert len(stub.prompts) == 6
    report = json.loads((easyrec_folder / "user_profile.llm.report.json").read_text())
    assert report["retries"] == 4


def test_an_error_the_client_does_not_retry_counts_no_retries(easyrec_folder):
    with StubLLM("another-key") as stub:  # 401: not retried, whatever --retries says
        result = _profiles(easyrec_folder, stub.url, "--retries", "3")
    assert "failed: http_401: 2; retries: 0;" in result.output, result.output
