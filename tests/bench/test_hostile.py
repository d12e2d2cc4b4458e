"""``bench/hostile.py``, the hostile-client probe: each attack against a real server, and its table."""

from __future__ import annotations

from bench.hostile import run_attacks, table
from tests.service.conftest import ServeFactory


def test_every_attack_is_answered_and_closed_and_the_table_says_so(serve: ServeFactory) -> None:
    with serve(header_timeout_s=1, body_timeout_s=1) as server:
        outcomes = {o.attack: o for o in run_attacks(server.url, list(ATTACKS), 10, None, "affine")}
    for name, (connections, answer) in ATTACKS.items():
        outcome = outcomes[name]
        assert outcome.still_open == 0 and len(outcome.held_s) == connections, name
        assert outcome.answers == {answer: connections}, (name, outcome.answers)
        assert outcome.normal_s, f"the normal client got no answer during {name}"
    for name in ("slowloris", "silent", "slow-body"):  # 1 s timeouts, and a busy machine's slack
        assert max(outcomes[name].held_s) < 3, name
    rendered = table(list(outcomes.values()))
    assert "| slowloris | 500 | 500 × HTTP/1.1 408 Request Timeout |" in rendered


ATTACKS = {
    "headers": (8, "HTTP/1.1 431 Request Header Fields Too Large"),
    "fields": (1, "HTTP/1.1 431 Request Header Fields Too Large"),
    "slowloris": (500, "HTTP/1.1 408 Request Timeout"),
    "silent": (2000, "closed, no answer"),
    "slow-body": (200, "HTTP/1.1 408 Request Timeout"),
}
