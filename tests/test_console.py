"""Progress in logs: plain lines, never a terminal's escape codes."""

import subprocess
import sys

from pipeline.cli import main

SCRIPT = "from pipeline.console import progress_bar\nbar = progress_bar(3, 'image')\nfor _ in range(3): bar.add(1)\n"


def test_a_progress_bar_written_to_a_log_is_one_plain_line():
    output = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    assert "\x1b" not in output and "\r" not in output and "\b" not in output
    assert output.startswith("3/3 - ") and output.count("\n") == 1


def test_a_stage_writes_no_escape_codes_into_a_log(tmp_path, capfd):
    # Under pytest stdout is not a terminal, as in a batch job's log.
    assert main(["--stage", "prepare", "--preset", "smoke", "--run-dir", str(tmp_path / "run"),
                 "--set", "data.num_train=1", "--set", "data.num_val=1", "--set", "data.num_test=1"]) == 0
    output = capfd.readouterr().out
    assert "weight map" in output and "\x1b" not in output and "\r" not in output
