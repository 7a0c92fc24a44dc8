"""--log-format json / --log-level: pyfork's own log lines (pyfork.logfmt), real processes."""
import json
import os
import signal

import pytest

import obs_harness as O
import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(120)]


def test_json_lines_with_structured_fields(tmp_path):
    O.write_apps(tmp_path)
    with H.Server(tmp_path, os.environ.get("PYFORK_BACKEND") or "python",
                  "--interface", "wsgi", "--log-format", "json", "--log-level", "debug",
                  app="wapp:app", workers=1) as srv:
        srv.start(ready=1)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        lines = [x for x in srv.log().splitlines() if x.strip()]
    recs = [json.loads(x) for x in lines]            # every line is one JSON object
    assert recs and all({"time", "level", "logger", "pid", "message"} <= set(r) for r in recs)
    assert any(r["level"] == "info" and "Listening" in r["message"] for r in recs)


def test_log_level_warning_hides_info(tmp_path):
    O.write_apps(tmp_path)
    with H.Server(tmp_path, "python", "--interface", "wsgi", "--log-level", "warning",
                  app="wapp:app", workers=1) as srv:
        srv.start(ready=1)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        assert "[INFO]" not in srv.log()


def test_bad_log_options_exit_2():
    from pyfork import cli
    assert cli.main(["serve", "--log-format", "xml"]) == 2
    assert cli.main(["serve", "--log-level", "loud"]) == 2
