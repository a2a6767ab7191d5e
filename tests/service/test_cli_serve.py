"""``segscope serve`` parses its options into the service config and hands the app to uvicorn."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'segscope[serve]'")

import sys
from typing import Any

import uvicorn

from segscope.cli import main


def test_serve_runs_the_app_on_localhost_with_the_given_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))
    argv = ["serve", "--model", "demo", "--device", "cpu", "--port", "8123", "--batch-size", "2", "--queue-size", "3",
            "--max-upload-mb", "0.5", "--max-pixels", "1000", "--timeout-s", "7", "--task", "semantic"]
    assert main(argv) == 0
    (call,) = calls
    assert call["host"] == "127.0.0.1" and call["port"] == 8123
    config = call["app"].state.config
    assert (config.batch_size, config.queue_size, config.max_upload_bytes) == (2, 3, 512 * 1024)
    assert (config.max_pixels, config.timeout_s, config.task) == (1000, 7.0, "semantic")
    assert call["app"].state.segmenters.default.task == "semantic"


def test_serve_refuses_bad_settings_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--batch-size", "0", "--queue-size", "0"]) == 2
    assert "invalid service setting(s): batch_size=0, queue_size=0" in capsys.readouterr().err


def test_serve_without_the_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--model", "demo"]) == 2
    assert "pip install 'segscope[serve]'" in capsys.readouterr().err
