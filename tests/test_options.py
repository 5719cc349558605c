"""Options are declared once (relex.options) and reach the library from every face."""

import argparse
import inspect

import pytest

import relex
from relex import cli
from relex.analysis.watch import watch
from relex.demo.run import run_demo
from relex.evaluation.evaluate import evaluate, grade_responses
from relex.evaluation.sweep import sweep
from relex.options import FitOptions, Inputs, LoopOptions, OutputOptions
from relex.errors import RelexError

#: the functions each command calls, and the flags it hands to another function
TARGETS = {"extrapolate": [relex.extrapolate], "reconstruct": [relex.reconstruct],
           "analyze": [relex.analyze], "eval": [evaluate, grade_responses], "sweep": [sweep],
           "watch": [watch], "demo": [run_demo]}
RENAMED = {("watch", "targets"): "target", ("eval", "responses"): "path"}


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", sorted(TARGETS))
def test_every_flag_reaches_the_library(command):
    """A flag the called function does not take would be silently ignored."""
    sub = _subparsers(cli.build_parser())[command]
    accepted = set()
    for fn in TARGETS[command]:
        accepted |= set(inspect.signature(fn).parameters)
    for action in sub._actions:
        if action.dest in ("help", "run"):
            continue
        name = RENAMED.get((command, action.dest), action.dest)
        assert name in accepted, f"relex {command} {action.option_strings}: no keyword {name}"


def test_no_flag_declared_twice_in_a_command():
    for name, sub in _subparsers(cli.build_parser()).items():
        flags = [f for a in sub._actions for f in a.option_strings]
        assert len(flags) == len(set(flags)), name


def test_public_functions_document_and_check_their_options():
    sig = inspect.signature(relex.extrapolate)
    for name in (*Inputs.names(), *FitOptions.names(), *OutputOptions.names(), "group"):
        assert name in sig.parameters
    assert sig.parameters["output"].default is inspect.Parameter.empty
    assert sig.parameters["rank"].default == 1
    assert "max_memory:" in relex.extrapolate.__doc__ and "Example" in relex.extrapolate.__doc__
    with pytest.raises(TypeError, match="unexpected keyword argument 'rnak'"):
        relex.extrapolate("run", output="o", targets=[5], rnak=2)
    with pytest.raises(TypeError, match="missing required keyword argument 'targets'"):
        relex.extrapolate("run", output="o")
    with pytest.raises(TypeError, match="unexpected keyword argument 'targets'"):
        relex.analyze("run", output="o", targets=[5])  # analyze takes only part of the fit


def test_cli_and_api_share_defaults():
    args = cli.build_parser().parse_args(["extrapolate", "run", "--target", "9", "-o", "x"])
    assert FitOptions.from_args(args) == FitOptions(targets=[9])
    assert Inputs.from_args(args) == Inputs(run_dir="run")
    assert OutputOptions.from_args(args) == OutputOptions(output="x")


def test_loop_options_from_a_config_section():
    assert LoopOptions.typed({"cycle": "30", "guard_margin": "0.1", "snapshot_dir": None},
                             "relex") == {"cycle": 30, "guard_margin": 0.1}
    with pytest.raises(RelexError, match=r"relex\.cylce: not an option"):
        LoopOptions.typed({"cylce": 3}, "relex")
    with pytest.raises(RelexError, match=r"relex\.jump='far': expected int"):
        LoopOptions.typed({"jump": "far"}, "relex")
    assert LoopOptions.typed({"guard_steps": "5"}, "relex") == {"guard_steps": 5}


def test_help_texts_read_as_written(capsys):
    for command in ("demo", "extrapolate"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert "%%" not in out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "15% of the run" in capsys.readouterr().out
