"""Every example of README.md and docs/ runs, page by page, against the scripted model (see ``docs_kit``).

A page is one test: its python and console blocks run in order and share what they define, as a reader would run
them. The other tests hold the rules that keep the pages honest: every code block either runs or its language is
listed with the reason it does not, API calls never hide in blocks that do not run, links between pages resolve, and
the DynamoDB table the operations page tells you to create is the table the store creates.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from docs_kit import NOT_RUN, PAGES, ROOT, RUN, PageRun, fenced_blocks, parse, parse_session, redis_server
from moto import mock_aws

from strands_py.idempotency import DynamoDBIdempotencyStore


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials and a region: boto3 clients the examples create talk to moto, never to AWS."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def global_tracer_provider() -> Iterator[None]:
    """The telemetry page installs a global tracer provider, as an application does once: undone after the page.

    OpenTelemetry lets a process set it only once, and the proxy tracers handed out before (strands-py's, strands')
    keep the real tracer they found; left alone, the page's provider would record every span of every later test of
    the session. So the globals are put back and the proxies forget their tracer (OpenTelemetry's private state,
    as its own test utilities reset it).
    """
    from opentelemetry import trace

    saved = trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE._done
    yield
    if trace._TRACER_PROVIDER is saved[0]:
        return
    trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE._done = saved
    for candidate in gc.get_objects():
        if isinstance(candidate, trace.ProxyTracer):
            candidate._real_tracer = None


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_the_examples_of_the_page_run(
    page: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    aws: None,
    global_tracer_provider: None,
    request: pytest.FixtureRequest,
) -> None:
    document = parse(page)
    examples = list(document)
    if not examples:
        pytest.skip("no examples")
    monkeypatch.chdir(tmp_path)
    if "REDIS_URL" in document.text:
        monkeypatch.setenv("REDIS_URL", request.getfixturevalue("docs_redis"))
    with mock_aws(), PageRun(document, tmp_path):
        for example in examples:
            example.evaluate()


@pytest.fixture
def docs_redis() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_every_code_block_runs_or_says_why_not(page: Path) -> None:
    for line, language, source in fenced_blocks(page):
        where = f"{_id(page)}:{line}"
        assert language in RUN or language in NOT_RUN, f"{where}: a ```{language} block is neither run nor listed"
        if language in NOT_RUN:
            # A request to the server belongs in a console block, which runs; so does any python.
            assert "curl" not in source and "localhost" not in source, f"{where}: an HTTP call in a block not run"
        if language == "console":
            assert parse_session(source), f"{where}: an empty console block"


def test_the_suite_covers_every_page_and_runs_something() -> None:
    pages = {_id(page) for page in PAGES}
    assert "README.md" in pages and "docs/index.md" in pages
    run = sum(1 for page in PAGES for _, language, _ in fenced_blocks(page) if language in RUN)
    assert run >= 40, run  # a parser that silently stopped matching blocks would run nothing


def test_every_relative_link_of_the_readme_resolves() -> None:
    # The docs' own links are checked by `mkdocs build --strict`; the README lives outside docs/.
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to a missing {target}"


def _tables_page() -> str:
    return (ROOT / "docs" / "operations" / "tables.md").read_text(encoding="utf-8")


def test_the_documented_dynamodb_table_is_the_table_the_store_creates(aws: None) -> None:
    yaml = pytest.importorskip("yaml")
    blocks = [source for _, language, source in fenced_blocks(ROOT / "docs/operations/tables.md") if language == "yaml"]
    assert len(blocks) == 1
    documented = yaml.safe_load(blocks[0])["IdempotencyTable"]["Properties"]
    cli = next(s for _, language, s in fenced_blocks(ROOT / "docs/operations/tables.md") if "create-table" in s)
    with mock_aws():
        store = DynamoDBIdempotencyStore(documented["TableName"], region_name="us-east-1")
        try:
            store.create_table()
            client = boto3.client("dynamodb", region_name="us-east-1")
            table = client.describe_table(TableName=documented["TableName"])["Table"]
            ttl = client.describe_time_to_live(TableName=documented["TableName"])["TimeToLiveDescription"]
        finally:
            store.close()
    assert documented["KeySchema"] == table["KeySchema"]
    assert documented["AttributeDefinitions"] == table["AttributeDefinitions"]
    assert documented["BillingMode"] == table["BillingModeSummary"]["BillingMode"]
    assert documented["TimeToLiveSpecification"] == {"AttributeName": ttl["AttributeName"], "Enabled": True}
    for schema in table["KeySchema"]:
        assert f"AttributeName={schema['AttributeName']},KeyType={schema['KeyType']}" in cli
    for attribute in table["AttributeDefinitions"]:
        assert f"AttributeName={attribute['AttributeName']},AttributeType={attribute['AttributeType']}" in cli
    assert f"AttributeName={ttl['AttributeName']}" in cli and "PAY_PER_REQUEST" in cli


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param("$ echo 'one'\ntwo", id="wrong-output"),
        pytest.param("$ false", id="failing-command"),
    ],
)
def test_a_console_block_that_lies_fails(broken: str, tmp_path: Path) -> None:
    # The negative control of the console evaluator: a wrong expected output, or a failing command, fails its page.
    page = tmp_path / "lie.md"
    page.write_text(f"```console\n{broken}\n```\n", encoding="utf-8")
    document = parse(page)
    with PageRun(document, tmp_path), pytest.raises(AssertionError):
        for example in document:
            example.evaluate()


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param('print("two")  #> one', id="wrong-print"),
        pytest.param("import asyncio\nawait asyncio.sleep(0)\nassert False", id="failing-await"),
        pytest.param("x = undefined_name", id="undefined-name"),
    ],
)
def test_a_python_block_that_lies_fails(broken: str, tmp_path: Path) -> None:
    # The negative control of the python evaluator: a wrong #> output, a failing assertion after a top-level await, or
    # a name the page never defined fails its page.
    page = tmp_path / "lie.md"
    page.write_text(f"```python\n{broken}\n```\n", encoding="utf-8")
    document = parse(page)
    with PageRun(document, tmp_path), pytest.raises((AssertionError, NameError)):
        for example in document:
            example.evaluate()


def test_a_true_page_passes(tmp_path: Path) -> None:
    # The positive control beside the negative ones: the same machinery accepts a page that tells the truth.
    page = tmp_path / "true.md"
    page.write_text(
        "```python\nimport asyncio\nx = await asyncio.sleep(0, 2)\nprint(x)  #> 2\n```\n\n"
        "```console\n$ echo 'one' && printf 'a\\nb\\n'\none\na\n...\n```\n",
        encoding="utf-8",
    )
    document = parse(page)
    with PageRun(document, tmp_path):
        for example in document:
            example.evaluate()
