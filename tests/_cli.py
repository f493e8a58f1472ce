"""Running the ``manifold-ext`` command line in-process, for the CLI tests."""

from manifold_ext.cli import main


def run(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``manifold-ext ARGV`` (arguments turned to strings)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error(capsys, command, *argv):
    """Run a command that must fail on bad input: exit 2, one line on stderr; the message."""
    code, out, err = run(capsys, command, *argv)
    assert code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    prefix = f"manifold-ext {command}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix):]
