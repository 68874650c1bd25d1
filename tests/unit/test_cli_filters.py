"""`mailgatectl filters`: the effective chains, as the gateway would build them."""

from __future__ import annotations

import os
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from gateway import cli
from gateway.filters import registry

THIRD_PARTY = EntryPoint("static", "gateway.filters.testing:StaticFilter", registry.ENTRY_POINT_GROUP)


@pytest.fixture(autouse=True)
def third_party(monkeypatch: pytest.MonkeyPatch) -> None:
    """One third-party filter, "static", registered through the entry-point group."""
    monkeypatch.setattr(registry, "entry_points", lambda group: [THIRD_PARTY])


def config_file(tmp_path: Path, filters: str) -> str:
    path = tmp_path / "mailgate.toml"
    state = tmp_path / "state"
    path.write_text(f'[gateway]\nstate_dir = "{state}"\n' + textwrap.dedent(filters), encoding="utf-8")
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_filters_prints_each_chain_in_the_configured_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "block.txt").write_text("@usa.com\n")
    path = config_file(
        tmp_path,
        """
        [filters]
        inbound = ["lists", "late"]
        outbound = ["late", "lists"]
        [filters.lists]
        block_clients = ["192.0.2.0/24"]
        block_senders_files = ["block.txt"]
        [filters.late]
        filter = "static"
        stages = ["rcpt"]
        timeout = "2s"
        on_failure = "continue"
        """,
    )
    status, out, err = run(capsys, "--config", path, "filters")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "inbound:"
    assert lines[1].split() == ["1.", "lists", "stages=connect,mail", "timeout=30s", "on_failure=defer"]
    assert lines[2].split() == ["2.", "late", "stages=rcpt", "timeout=2s", "on_failure=continue"]
    assert lines[3] == "outbound:"
    assert [line.split()[1] for line in lines[4:6]] == ["late", "lists"]
    assert lines[6:] == ["fetched:", "  (empty)"]
    # nothing was created or opened on the way
    assert not os.path.exists(tmp_path / "state")


def test_filters_available_lists_built_in_and_third_party_filters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "--config", config_file(tmp_path, ""), "filters", "--available")
    assert status == 0
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out.splitlines()}
    assert rows["lists"] == ["gateway.filters.lists:Lists", "built in"]
    assert rows["static"] == ["gateway.filters.testing:StaticFilter", "entry point (mailgate.filters)"]
    assert next(iter(rows)) == "lists"  # the built-in table's order, third parties after it
    assert list(rows)[-1] == "static"


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (
            '[filters]\ninbound = ["lists", "nosuch"]\n',
            "mailgate.toml, line 4: filters.inbound: unknown filter 'nosuch'",
        ),
        (
            '[filters]\ninbound = ["lists"]\n[filters.lists]\nblock_clients = ["10.0.0.300"]\n',
            "mailgate.toml, line 6: filters.lists.block_clients: '10.0.0.300' is not an IP address",
        ),
        (
            '[filters]\ninbound = ["lists"]\n[filters.lists]\nblock_client = ["10.0.0.1"]\n',
            "mailgate.toml, line 6: filters.lists.block_client: unknown key",
        ),
    ],
)
def test_a_bad_chain_is_one_line_and_status_2_like_config_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], filters: str, message: str
) -> None:
    status, out, err = run(capsys, "--config", config_file(tmp_path, filters), "filters")
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("mailgatectl: ") and message in err


def test_a_bad_list_file_names_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "block.txt").write_text("@good.test\n\nnot@@valid@\n")
    path = config_file(
        tmp_path, '[filters]\ninbound = ["lists"]\n[filters.lists]\nblock_senders_files = ["block.txt"]\n'
    )
    status, _, err = run(capsys, "--config", path, "filters")
    assert status == 2
    assert f"{tmp_path}/block.txt, line 3: 'not@@valid@' is not an address or a domain" in err
