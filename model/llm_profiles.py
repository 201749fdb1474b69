"""Profiles written by an LLM through any OpenAI-compatible chat-completions API (OpenAI, a
gateway, or a local vLLM / llama.cpp / Ollama server), with the official `openai` client.

A user's profile is written from the profiles of the items in their *training* interactions
only; an item's from its metadata (`item_meta.json`) and, when given, its reviews. Prompt
templates are text files (system prompt, a line `---`, user prompt with `${history}` or
`${metadata}` / `${reviews}`); the template's name and digest are stored with every profile.

Profiles go to `user_profile.llm.json` / `item_profile.llm.json` beside the data (the same
JSON-lines format; the loader reads them after the data's own profile files, which are never
changed). The run is resumable and loses nothing when interrupted: each answer is appended to
a journal (`user_profile.llm.json.partial`) as it arrives, and the journal is merged into the
file atomically at the end, or at the start of the next run after a crash. Users and items
that already have a written profile are skipped. One run at a time writes a folder's file."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import string
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from tqdm import tqdm

from dataHandler import DataError, Dataset, iter_json_lines, read_id_lines
from model.config import option
from model.hygiene import scrub_pii
from utils import atomic_path, log, sha256_of, write_json_atomic

PROMPTS = Path(__file__).resolve().parent / "prompts"
TARGETS = {"users": ("user_id", "user_profile.llm.json"),
           "items": ("item_id", "item_profile.llm.json")}
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text, used for estimates only
SHOWN_IN_DRY_RUN = 2
MIN_PROFILE_CHARS = 20


class ProfileError(DataError):
    """A template, reviews file or API setting that cannot be used."""


@dataclass
class LLMConfig:
    llm_url: str = option("https://api.openai.com/v1", "Base URL of an OpenAI-compatible "
                          "chat-completions API, e.g. http://127.0.0.1:8001/v1 for a local vLLM, "
                          "llama.cpp or Ollama server.")
    llm_model: str = option("gpt-4o-mini", "Model name as the API knows it.")
    api_key_env: str = option("OPENAI_API_KEY", "Environment variable holding the API key (the "
                              "key is never read from a file nor written to a log or report; "
                              "local servers usually need none).")
    limit: int = option(0, "Write at most this many new profiles in this run (0: all missing).")
    concurrency: int = option(4, "Requests in flight at once.")
    retries: int = option(5, "Retries per request on 429, 5xx, timeouts and connection errors, "
                          "with exponential backoff (the server's Retry-After is honoured).")
    timeout: float = option(60.0, "Seconds before one request attempt times out.")
    max_tokens: int = option(200, "Longest answer, in tokens.")
    temperature: float = option(0.2, "Sampling temperature.")
    template: str | None = option(None, "Prompt template file [default: model/prompts/"
                                  "user_profile.txt or item_profile.txt].", kind="path")
    reviews: str | None = option(None, "Item reviews for item prompts, JSON lines {\"item_id\": "
                                 "int, \"review\": str, \"user_id\": int}; a review of a "
                                 "pair outside the training split is left out.", kind="path")
    history: int = option(20, "Training items (most visited first) shown in a user prompt.")
    price_input: float = option(0.0, "USD per 1M prompt tokens, for the cost report.")
    price_output: float = option(0.0, "USD per 1M answer tokens, for the cost report.")
    dry_run: bool = option(False, "Print the first prompts and the estimated token count; "
                           "send nothing.")


@dataclass
class Template:
    name: str
    digest: str
    system: str
    user: string.Template

    @classmethod
    def load(cls, path: Path) -> Template:
        if not path.is_file():
            raise ProfileError(f"{path}: prompt template not found")
        text = path.read_text(encoding="utf-8")
        if "\n---\n" not in text:
            raise ProfileError(f"{path}: a template is a system prompt, a line '---', and the "
                               "user prompt")
        system, user = text.split("\n---\n", 1)
        return cls(path.name, sha256_of(text)[:16], system.strip(), string.Template(user.strip()))

    def fill(self, **fields: str) -> str:
        try:
            return self.user.substitute(fields)
        except (KeyError, ValueError) as error:
            raise ProfileError(f"template {self.name}: placeholder {error} is not one of "
                               f"{', '.join('${%s}' % f for f in fields)}") from None


# ---------------------------------------------------------------- what to ask


def user_prompts(dataset: Dataset, template: Template, history: int) -> Iterator[tuple[int, str]]:
    """(user, prompt) for users without a written profile whose training items have text."""
    train = dataset.train
    for user in np.flatnonzero(dataset.user_profile_source != "written"):
        start, end = train.indptr[user], train.indptr[user + 1]
        items, counts = train.indices[start:end], train.data[start:end]
        ordered = items[np.lexsort((items, -counts))]
        texts = [dataset.item_profiles[i] for i in ordered if dataset.item_profiles[i]]
        if texts:
            lines = "\n".join(f"- {t[:300]}" for t in texts[:history])
            yield int(user), template.fill(history=lines)


def item_prompts(dataset: Dataset, folder: Path, template: Template,
                 reviews_file: str | None) -> Iterator[tuple[int, str]]:
    """(item, prompt) for items without a written profile that have metadata or reviews."""
    metadata = read_id_lines(folder / "item_meta.json", "item_id", dataset.n_items) \
        if (folder / "item_meta.json").exists() else {}
    reviews = _read_reviews(Path(reviews_file), dataset) if reviews_file else {}
    for item in np.flatnonzero(dataset.item_profile_source != "written"):
        meta = {k: v for k, v in metadata.get(int(item), (0, {}))[1].items() if k != "item_id"}
        said = reviews.get(int(item), [])
        if not meta and not said:
            continue
        shown = "\n".join(f"{k}: {scrub_pii(json.dumps(v, ensure_ascii=False))[0]}"
                          for k, v in meta.items()) or "(none)"
        quoted = "\n".join(f"- {scrub_pii(r[:500])[0]}" for r in said[:5]) or "(none)"
        yield int(item), template.fill(metadata=shown, reviews=quoted)


def _read_reviews(path: Path, dataset: Dataset) -> dict[int, list[str]]:
    """Reviews per item. A review with a `user_id` is kept only if that user's interaction
    with the item is in the training split (a review is the interaction: one from a
    validation or test pair would leak it into the item's profile)."""
    if not path.is_file():
        raise ProfileError(f"{path}: reviews file not found")
    reviews: dict[int, list[str]] = {}
    held_out = unchecked = 0
    for line_number, record in iter_json_lines(path):
        item, text, user = record.get("item_id"), record.get("review"), record.get("user_id")
        if not isinstance(item, int) or not 0 <= item < dataset.n_items \
                or not isinstance(text, str) or not (user is None or isinstance(user, int)):
            raise ProfileError(f"{path}:{line_number}: expected {{\"item_id\": "
                               f"0..{dataset.n_items - 1}, \"review\": str, optional "
                               "\"user_id\": int}")
        if user is None:
            unchecked += 1
        elif not 0 <= user < dataset.n_users or dataset.train[user, item] == 0:
            held_out += 1
            continue
        reviews.setdefault(item, []).append(text)
    if held_out:
        log(f"{path}: {held_out} reviews of pairs outside the training split left out")
    if unchecked:
        log(f"{path}: {unchecked} reviews without user_id: make sure they come from training "
            "interactions only")
    return reviews


# ---------------------------------------------------------------- the profile file


class ProfileFile:
    """The profile file and its journal of answers not yet merged into it."""

    def __init__(self, path: Path, id_key: str):
        self.path, self.id_key = path, id_key
        self.journal = path.with_name(path.name + ".partial")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One `profiles` run per file at a time (a second one stops with a clear error)."""
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ProfileError(f"{self.path}: another `profiles` run is writing it") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ids(self) -> set[int]:
        return {key for key, _ in self._records(self.path)} | \
            {key for key, _ in self._records(self.journal)}

    def _records(self, path: Path) -> Iterator[tuple[int, str]]:
        if not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:  # a journal line cut by a crash is dropped (and asked for again)
                record = json.loads(line)
                yield int(record[self.id_key]), line
            except (ValueError, KeyError, TypeError):
                continue

    def append(self, handle, record: dict) -> None:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())

    def commit(self) -> int:
        """Merge the journal into the file atomically; return how many profiles were added."""
        if not self.journal.exists():
            return 0
        have = {key for key, _ in self._records(self.path)}
        new = {key: line for key, line in self._records(self.journal) if key not in have}
        if new:
            old = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            with atomic_path(self.path) as tmp:
                tmp.write_text(old + ("\n" if old and not old.endswith("\n") else "")
                               + "".join(line + "\n" for line in new.values()), encoding="utf-8")
        self.journal.unlink()
        return len(new)


# ---------------------------------------------------------------- asking


class ProfileWriter:
    """Sends prompts to the chat-completions API and collects answers, tokens and failures."""

    def __init__(self, config: LLMConfig):
        from openai import OpenAI  # imported here: only this command needs it

        self.config = config
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", config.api_key_env):
            raise ProfileError("--api-key-env takes the NAME of an environment variable that "
                               "holds the key, not the key itself")
        key = os.environ.get(config.api_key_env)
        if not key:
            log(f"${config.api_key_env} is not set: sending no API key (fine for local servers)")
        self.client = OpenAI(base_url=config.llm_url, api_key=key or "not-set",
                             max_retries=config.retries, timeout=config.timeout)
        self.usage: Counter = Counter()  # updated from the worker threads, under the lock
        self.lock = threading.Lock()
        self.failed: Counter = Counter()
        self.failed_ids: list[int] = []

    def ask(self, system: str, prompt: str) -> str:
        """The answer's text; raises on a failed request or an unusable answer."""
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.config.llm_model, max_tokens=self.config.max_tokens,
                temperature=self.config.temperature, messages=[
                    {"role": "system", "content": system}, {"role": "user", "content": prompt}])
        except Exception as error:
            with self.lock:
                self.usage["retries"] += _retries_before(error)
            raise
        try:
            completion = raw.parse()
            text = completion.choices[0].message.content
            usage = completion.usage
        except Exception as error:  # whatever the server sent, it is not a usable completion
            raise MalformedAnswer(f"unreadable answer ({type(error).__name__})") from None
        finally:
            with self.lock:
                self.usage["retries"] += raw.retries_taken
        with self.lock:
            self.usage["prompt_tokens"] += getattr(usage, "prompt_tokens", 0) or 0
            self.usage["completion_tokens"] += getattr(usage, "completion_tokens", 0) or 0
        text = (text or "").strip().strip('"').strip()
        if len(text) < MIN_PROFILE_CHARS:
            raise MalformedAnswer(f"answer too short ({len(text)} characters)")
        return scrub_pii(text)[0]  # an LLM may echo an address it was never shown

    def note_failure(self, key: int, error: Exception) -> None:
        self.failed[_failure_kind(error)] += 1
        if len(self.failed_ids) < 20:
            self.failed_ids.append(key)


class MalformedAnswer(ValueError):
    pass


def _retries_before(error: Exception) -> int:
    """Retries the client spent before giving up: it numbers each attempt in the request's
    x-stainless-retry-count header (0 for an error it does not retry, such as a 401)."""
    try:  # (httpx raises on `.request` of an error that never had one)
        request = getattr(error, "request", None)
        return int(request.headers.get("x-stainless-retry-count", 0)) \
            if request is not None else 0
    except Exception:  # noqa: BLE001 - counting must never hide the request's own error
        return 0


def _failure_kind(error: Exception) -> str:
    import openai

    if isinstance(error, MalformedAnswer):
        return "malformed_answer"
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.RateLimitError):
        return "rate_limited"
    if isinstance(error, openai.APIStatusError):
        return f"http_{error.status_code}"
    if isinstance(error, openai.APIConnectionError):
        return "connection"
    return type(error).__name__


def write_llm_profiles(dataset: Dataset, folder: Path, target: str, config: LLMConfig) -> dict:
    """Write missing `target` ('users' or 'items') profiles of `dataset` into `folder`; return
    the run's report (also written to FOLDER/TARGET_profile.report.json)."""
    _check(config)
    id_key, file_name = TARGETS[target]
    template = Template.load(Path(config.template) if config.template
                             else PROMPTS / f"{target[:-1]}_profile.txt")
    profiles = ProfileFile(folder / file_name, id_key)
    with profiles.locked():
        recovered = profiles.commit()  # answers of an interrupted earlier run
        if recovered:  # their ids are skipped below (they are in the file now)
            log(f"{recovered} profiles recovered from an interrupted run's journal")
        done = profiles.ids()
        prompts = user_prompts(dataset, template, config.history) if target == "users" else \
            item_prompts(dataset, folder, template, config.reviews)
        jobs = [(key, prompt) for key, prompt in prompts if key not in done]
        if config.limit:
            jobs = jobs[:config.limit]
        if config.dry_run:
            return _dry_run(jobs, template, config)
        writer, started = ProfileWriter(config), time.perf_counter()
        written = _ask_all(writer, jobs, template, profiles, id_key)
        report = _report(writer, config, template, profiles.path, written, len(jobs),
                         len(done), time.perf_counter() - started)
        write_json_atomic(folder / file_name.replace(".json", ".report.json"), report)
    return report


def _check(config: LLMConfig) -> None:
    lowest = {"limit": 0, "concurrency": 1, "retries": 0, "max_tokens": 1, "history": 1,
              "price_input": 0, "price_output": 0}
    for name, least in lowest.items():
        if getattr(config, name) < least:
            raise ProfileError(f"--{name.replace('_', '-')} must be at least {least}")
    if not config.timeout > 0:
        raise ProfileError("--timeout must be positive")


def _ask_all(writer: ProfileWriter, jobs: list[tuple[int, str]], template: Template,
             profiles: ProfileFile, id_key: str) -> int:
    written = 0
    stamp = {"template": template.name, "template_sha256": template.digest,
             "model": writer.config.llm_model, "written_by": "llm"}
    pool = ThreadPoolExecutor(max_workers=max(writer.config.concurrency, 1))
    pending = {pool.submit(writer.ask, template.system, prompt): key for key, prompt in jobs}
    try:
        with open(profiles.journal, "a", encoding="utf-8") as journal, \
                tqdm(total=len(jobs), desc="profiles", unit="profile") as bar:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    key = pending.pop(future)
                    try:
                        profiles.append(journal, {id_key: key, "profile": future.result(),
                                                  **stamp})
                        written += 1
                    except Exception as error:  # counted and reported; a rerun asks again
                        writer.note_failure(key, error)
                    bar.update()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)  # after Ctrl-C, do not wait on the API
        profiles.commit()
    return written


def _report(writer: ProfileWriter, config: LLMConfig, template: Template, path: Path,
            written: int, asked: int, existing: int, seconds: float) -> dict:
    tokens_in, tokens_out = writer.usage["prompt_tokens"], writer.usage["completion_tokens"]
    priced = config.price_input or config.price_output
    return {"file": str(path), "model": config.llm_model, "url": _redacted(config.llm_url),
            "template": template.name, "template_sha256": template.digest,
            "asked": asked, "written": written, "already_present": existing,
            "failed": dict(writer.failed), "failed_ids_first_20": writer.failed_ids,
            "retries": writer.usage["retries"], "prompt_tokens": tokens_in,
            "completion_tokens": tokens_out,
            "cost_usd": round((tokens_in * config.price_input
                               + tokens_out * config.price_output) / 1e6, 6) if priced else None,
            "seconds": round(seconds, 2)}


def _redacted(url: str) -> str:
    """The URL without user info or query (either may carry a credential)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", "")) if \
        parts.port is None else urlunsplit((parts.scheme, f"{parts.hostname}:{parts.port}",
                                             parts.path, "", ""))


def _dry_run(jobs: list[tuple[int, str]], template: Template, config: LLMConfig) -> dict:
    for key, prompt in jobs[:SHOWN_IN_DRY_RUN]:
        print(f"--- prompt for id {key} (template {template.name})\n[system] {template.system}"
              f"\n[user] {prompt}\n")
    prompt_tokens = sum(len(template.system) + len(p) for _, p in jobs) // CHARS_PER_TOKEN
    answer_tokens = config.max_tokens * len(jobs)
    cost = (prompt_tokens * config.price_input + answer_tokens * config.price_output) / 1e6
    return {"dry_run": True, "would_ask": len(jobs), "estimated_prompt_tokens": prompt_tokens,
            "max_answer_tokens": answer_tokens,
            "estimated_cost_usd_at_most": round(cost, 4) if cost else None}


def describe_report(report: dict) -> str:
    if report.get("dry_run"):
        cost = report["estimated_cost_usd_at_most"]
        return (f"dry run: {report['would_ask']:,} prompts, about "
                f"{report['estimated_prompt_tokens']:,} prompt tokens "
                f"({CHARS_PER_TOKEN} characters per token) and at most "
                f"{report['max_answer_tokens']:,} answer tokens"
                + (f"; at most ${cost:,.4f}" if cost else "; give --price-input/--price-output "
                   "for a cost estimate"))
    failed = ", ".join(f"{kind}: {n}" for kind, n in report["failed"].items()) or "none"
    cost = "n/a (give --price-input/--price-output)" if report["cost_usd"] is None \
        else f"${report['cost_usd']:,.4f}"
    return (f"{report['written']:,} of {report['asked']:,} profiles written to {report['file']} "
            f"({report['already_present']:,} were already there) in {report['seconds']} s; "
            f"failed: {failed}; retries: {report['retries']}; tokens: "
            f"{report['prompt_tokens']:,} prompt + {report['completion_tokens']:,} answer; "
            f"cost: {cost}" + ("; run again to retry the failed ones" if report["failed"] else ""))
