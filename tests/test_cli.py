"""The `paro` command line: calibrate → diff with a plan, errors a user can act on, GPU-only commands on a CPU."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from paro_compile import cli
from tests.report_helpers import check_html, check_schema

REPO = Path(__file__).resolve().parent.parent
MODEL = "paro_compile.toy:toy_model"
CALIB = "paro_compile.toy:toy_calibration_inputs"

FIXTURES = textwrap.dedent('''
    """Factories for tests/test_cli.py (written to a temporary directory)."""
    from paro_compile.toy.dit import toy_inputs, toy_model

    def small_inputs():  # 40 tokens: does not match a plan calibrated on toy_calibration_inputs (136 tokens)
        return [((), toy_inputs())]

    def not_a_model():
        return 42

    def broken_model():
        raise RuntimeError("weights not found")

    def bad_items():
        return [1, 2]
''')


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    (path / "cli_fixtures.py").write_text(FIXTURES)
    return path


def paro(workdir, *args, timeout=300, **env_extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(workdir), str(REPO), os.environ.get("PYTHONPATH", "")]),
               **env_extra)
    env.pop("TORCH_LOGS", None)
    return subprocess.run([sys.executable, "-m", "paro_compile.cli", *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plan_file(workdir):
    try:
        import paro_compile.calibration  # noqa: F401
        import paro_compile.plan  # noqa: F401
    except ImportError as error:
        pytest.skip(f"paro_compile.calibration is not importable yet: {error}")
    out = workdir / "toy.paro.safetensors"
    # The toy has no positional structure, so any order it prefers wins by noise and the default --min-order-gain
    # keeps the model's order; 0 keeps the mixed orders whose permutations the diff tests look at.
    done = paro(workdir, "calibrate", MODEL, "--inputs", CALIB, "--density", "0.5", "--min-order-gain", "0",
                "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote plan" in done.stdout and "blocks.0.attn#0" in done.stdout
    assert out.exists()
    return out


def test_calibrate_writes_a_loadable_plan(plan_file):
    from paro_compile.plan import Plan

    plan = Plan.load(plan_file)
    assert sorted(plan.sites) == ["blocks.0.attn#0", "blocks.1.attn#0"]
    assert all(site.seq_len == 136 and site.heads == 2 for site in plan.sites.values())


def test_calibrate_average_density_with_dense_steps(workdir, plan_file):
    from paro_compile.plan import Plan

    out = workdir / "avg.paro.safetensors"
    done = paro(workdir, "calibrate", MODEL, "--inputs", CALIB, "--dense-steps", "1", "--average-density", "0.75",
                "--out", str(out), "-q")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "average density 0.75" in done.stderr and "1 dense step(s)" in done.stderr
    meta = Plan.load(out).meta
    assert meta["dense_step_share"] == 0.5 and meta["sparse_density"] == 0.5  # timesteps 900 (dense) and 100
    bad = paro(workdir, "calibrate", MODEL, "--inputs", CALIB, "--dense-steps", "1", "--average-density", "0.4",
               "--out", str(workdir / "bad.paro.safetensors"), "-q")
    assert bad.returncode != 0 and "not reachable" in bad.stderr, bad.stderr[-2000:]


def test_calibrate_global_allocation(workdir):
    """--allocation global ranks the blocks of all sites together: the model's average stays at --density while the
    sites' densities may differ; the plan records the allocation."""
    from paro_compile.plan import Plan

    out = workdir / "global.paro.safetensors"
    done = paro(workdir, "calibrate", MODEL, "--inputs", CALIB, "--density", "0.5", "--allocation", "global",
                "--out", str(out), "-q")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "allocation global" in done.stderr
    plan = Plan.load(out)
    assert plan.meta["allocation"] == "global"
    uniform = workdir / "uniform.paro.safetensors"
    assert paro(workdir, "calibrate", MODEL, "--inputs", CALIB, "--density", "0.5", "--out", str(uniform),
                "-q").returncode == 0
    assert "allocation" not in Plan.load(uniform).meta
    assert abs(plan.overall_density() - Plan.load(uniform).overall_density()) < 0.05  # the same block budget
    bad = paro(workdir, "calibrate", MODEL, "--inputs", CALIB, "--allocation", "best", "--out", str(out), "-q")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_diff_with_plan_html_and_json(workdir, plan_file):
    html, js = workdir / "diff.html", workdir / "diff.json"
    done = paro(workdir, "diff", MODEL, "--inputs", CALIB, "-o", "allow_fp32=true", "-o", f"plan={plan_file}",
                "-o", "qk_bits=8", "--html", str(html), "--json", str(js))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.ops.paro.attention.default" in done.stdout and "blocks.1.attn#0" in done.stdout
    data = json.loads(js.read_text())
    check_schema(data)
    assert data["options"]["plan"] == str(plan_file) and data["options"]["allow_fp32"] is True
    sites = data["graphs"][0]["sites"]
    assert [s["lowered"] for s in sites] == [True, True]
    assert all(s["permutation"] != "identity" for s in sites if any(o != "FHW" for o in s["orders"]))
    assert any(o != "FHW" for s in sites for o in s["orders"])  # the toy's heads prefer other orders
    assert all(len(s["orders"]) == 2 and "×" in s["order_summary"] and s["density"] < 1.0 for s in sites)
    check_html(html.read_text())


def test_diff_plan_mismatch_exit_3(workdir, plan_file):
    done = paro(workdir, "diff", MODEL, "--inputs", "cli_fixtures:small_inputs", "-o", "allow_fp32=true",
                "-o", f"plan={plan_file}", "-o", "on_missing_shape=error", "-q")  # the default runs the grid dense
    assert done.returncode == 3, done.stderr[-3000:]
    assert "plan does not match" in done.stderr and "seq_len 136" in done.stderr


def test_diff_not_a_plan_file_exit_3(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    bogus = workdir / "bogus.safetensors"
    bogus.write_bytes(b"this is not a plan")
    rc = cli.main(["diff", MODEL, "--inputs", "cli_fixtures:small_inputs", "-o", "allow_fp32=true", "-o", f"plan={bogus}", "-q"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "not a paro plan file" in err


def test_diff_without_plan_shows_fallback_reasons(workdir, monkeypatch, capsys):
    """In-process (same code path as the subprocess runs above, minus a cold start)."""
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    assert cli.main(["diff", MODEL, "--inputs", "cli_fixtures:small_inputs", "--json", "r.json"]) == 0
    assert "SDPA: dtype torch.float32" in capsys.readouterr().out
    assert json.loads((workdir / "r.json").read_text())["summary"]["fallbacks"] == 2


@pytest.mark.parametrize("command", ["tune", "bench"])
def test_gpu_commands_without_cuda_exit_2(workdir, command):
    args = ["tune", "--shapes", "1,2,1024,64"] if command == "tune" else ["bench", "--quick"]
    done = paro(workdir, *args, PARO_CLI_FORCE_NO_CUDA="1")
    assert done.returncode == 2, done.stderr
    assert "needs a CUDA GPU" in done.stderr


def test_console_script_and_demo_help(workdir):
    script = shutil.which("paro", path=str(Path(sys.executable).parent)) or shutil.which("paro")
    if script is None:
        pytest.skip("the `paro` console script is not installed (pip install -e .)")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and all(c in done.stdout for c in ("calibrate", "diff", "tune", "bench", "demo"))
    done = subprocess.run([script, "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--frames" in done.stdout
    done = subprocess.run([script, "diff", "toy_model", "--inputs", CALIB], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "expected module:factory" in done.stderr


BAD = [
    (["diff", "paro_compile.toy", "--inputs", CALIB], "expected module:factory"),
    (["diff", "paro_compile.toy:nope", "--inputs", CALIB], "module 'paro_compile.toy' has no attribute 'nope'"),
    (["diff", "no_such_module_xyz:f", "--inputs", CALIB], "cannot import module 'no_such_module_xyz'"),
    (["diff", MODEL, "--inputs", "paro_compile.toy:missing"], "module 'paro_compile.toy' has no attribute 'missing'"),
    (["diff", "cli_fixtures:not_a_model", "--inputs", CALIB], "returned int, expected a torch.nn.Module"),
    (["diff", MODEL, "--inputs", "cli_fixtures:bad_items"], "each item must be an (args, kwargs) pair or a dict"),
    (["diff", MODEL, "--inputs", CALIB, "-o", "qk_bits"], "-o expects key=value"),
    (["diff", MODEL, "--inputs", CALIB, "-o", "qk_bits=3"], "qk_bits must be one of"),
    (["diff", MODEL, "--inputs", CALIB, "-o", "not_an_option=1"], "unknown paro/Inductor option"),
    (["diff", MODEL, "--inputs", CALIB, "-o", "plan=missing.safetensors"], "plan file 'missing.safetensors' does not exist"),
    (["diff", MODEL, "--inputs", CALIB, "--html", "no/such/dir/r.html"], "does not exist"),
    (["diff", MODEL, "--inputs", CALIB, "--call", "5"], "--call 5: the inputs factory gave 2 input(s)"),
    (["calibrate", MODEL, "--inputs", CALIB, "--density", "1.5"], "--density must be in (0, 1]"),
    (["calibrate", MODEL, "--inputs", CALIB, "--alpha", "-1"], "--alpha must be in [0, 1]"),
    (["calibrate", MODEL, "--inputs", CALIB, "--out", "no/such/dir/p.safetensors"], "does not exist"),
    (["calibrate", MODEL, "--inputs", CALIB, "--density", "0.5", "--average-density", "0.3"],
     "pass --density (per sparse bucket) or --average-density (over the sampling steps), not both"),
    (["calibrate", MODEL, "--inputs", CALIB, "--block-score", "output", "--allocation", "site"],
     "--block-score='output' supports --allocation='uniform' only"),
    (["calibrate", MODEL, "--inputs", CALIB, "--step-buckets", "0"], "--step-buckets must be >= 1, got 0"),
    (["calibrate", MODEL, "--inputs", CALIB, "--dense-steps", "-1"], "--dense-steps must be >= 0, got -1"),
    (["calibrate", MODEL, "--inputs", CALIB, "--orders", "FHW,FHW"], "--orders lists an order twice"),
    # --out is checked before the model is loaded (a broken model would exit 1)
    (["calibrate", "cli_fixtures:broken_model", "--inputs", CALIB, "--out", "."], "is a directory; give the plan file's path"),
    (["tune", "--shapes", "1,2,3"], "expected B,H,N,D"),
    (["tune", "--shapes", "1,2,1024,64", "--densities", "0.5,x"], "--densities: expected comma-separated numbers"),
    (["tune", "--shapes", "1,2,1024,64", "--dtypes", "float32"], "the kernels take float16/bfloat16"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[f"{b[0][0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_exit_2_with_clear_message(workdir, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert err.startswith(f"paro {argv[0]}: error: ")


def test_model_factory_that_raises_exits_1(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    assert cli.main(["diff", "cli_fixtures:broken_model", "--inputs", CALIB]) == 1
    assert "calling cli_fixtures:broken_model() failed: RuntimeError: weights not found" in capsys.readouterr().err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["diff", MODEL])  # --inputs missing
    assert exit_info.value.code == 2 and "--inputs" in capsys.readouterr().err


def test_option_values_are_json_when_possible():
    assert cli.parse_option("qk_bits=4") == ("qk_bits", 4)
    assert cli.parse_option("allow_fp32=true") == ("allow_fp32", True)
    assert cli.parse_option("pv_dtype=int8") == ("pv_dtype", "int8")
    assert cli.parse_option("plan=a=b.safetensors") == ("plan", "a=b.safetensors")
    assert cli.parse_option('inductor={"max_autotune": false}') == ("inductor", {"max_autotune": False})


def test_tune_prints_winners_with_a_gpu(monkeypatch, capsys, tmp_path):
    """The GPU path of `paro tune`, with the tuner replaced (runs on a CPU)."""
    import torch

    from paro_compile.kernels import attention

    seen = {}

    def fake_tune(shapes, densities, dtypes, **kwargs):
        seen.update(shapes=shapes, densities=densities, dtypes=dtypes, **kwargs)
        return [{"shape": list(shapes[0]), "density": 0.5, "dtype": "bfloat16", "key": "k", "kwargs": {"TILE_M": 128},
                 "num_warps": 8, "num_stages": 2, "tuned_now": True}]

    monkeypatch.setattr(cli, "cuda_available", lambda: True)
    monkeypatch.setattr(attention, "tune", fake_tune)
    out_json = tmp_path / "winners.json"
    assert cli.main(["tune", "--shapes", "1,24,4096,64", "--densities", "1.0,0.5", "--dtypes", "bfloat16,float16",
                     "--json", str(out_json)]) == 0
    assert seen["shapes"] == [[1, 24, 4096, 64]] and seen["densities"] == [1.0, 0.5]
    assert seen["dtypes"] == [torch.bfloat16, torch.float16]
    out = capsys.readouterr().out
    assert "1×24×4096×64" in out and "TILE_M" in out
    assert json.loads(out_json.read_text())[0]["num_warps"] == 8


def test_bench_runs_the_benchmark_main_with_a_gpu(monkeypatch, capsys, tmp_path):
    script = tmp_path / "bench_attention.py"
    script.write_text("from pathlib import Path\n"
                      "def main(argv):\n    print('BENCH', argv)\n"
                      "    out = Path(argv[argv.index('--out') + 1])\n    out.mkdir(exist_ok=True)\n"
                      "    (out / 'attention.json').write_text('x')\n    (out / 'attention.png').write_text('x')\n    return 0\n")
    monkeypatch.setattr(cli, "cuda_available", lambda: True)
    monkeypatch.setattr(cli, "find_bench_script", lambda: script)
    out = tmp_path / "res"
    assert cli.main(["bench", "--quick", "--out", str(out), "--densities", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"BENCH ['--quick', '--out', '{out}', '--densities', '0.5']" in printed
    assert f"wrote {out / 'attention.json'}, {out / 'attention.png'}" in printed
    monkeypatch.setattr(cli, "find_bench_script", lambda: None)
    assert cli.main(["bench"]) == 2
    assert "benchmarks/bench_attention.py not found" in capsys.readouterr().err


def test_calibrate_alpha_default_is_the_api_default():
    """`paro calibrate` used to default --alpha to 0.7 while calibrate() and auto-calibration used 0.9."""
    from paro_compile.calibration import DEFAULT_ALPHA, CalibrationOptions

    args = cli.build_parser().parse_args(["calibrate", MODEL, "--inputs", CALIB])
    assert args.alpha == CalibrationOptions().alpha == DEFAULT_ALPHA == 0.9
    assert cli.calibration_options_from_args(args) == CalibrationOptions()


def test_calibrate_flags_and_docs_follow_every_option():
    """One flag per CalibrationOptions field with the dataclass's default, type, choices and help; docs/cli.md carries
    the generated flag table and docs/calibration.md states the same defaults."""
    from paro_compile.calibration.options import flags_markdown_table, option_fields, option_flag, shown_default
    from tests.calibration.calibration_helpers import docs_option_defaults

    parser = cli.build_parser()
    calibrate_parser = parser._subparsers._group_actions[0].choices["calibrate"]
    actions = {action.dest: action for action in calibrate_parser._actions}
    defaults = parser.parse_args(["calibrate", MODEL, "--inputs", CALIB])
    cli_doc = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    calibration_doc = docs_option_defaults((REPO / "docs" / "calibration.md").read_text(encoding="utf-8"))
    for option in option_fields():
        action = actions[option.name]
        assert action.option_strings == [option_flag(option.name)]
        assert getattr(defaults, option.name) == option.default, option.name
        assert action.choices == option.metadata["choices"], option.name
        assert option.metadata["help"] in action.help.replace("%%", "%"), option.name
        assert f"| {shown_default(option)} |" in next(line for line in cli_doc.splitlines()
                                                    if line.startswith(f"| `{option_flag(option.name)} ")), option.name
        assert calibration_doc.get(option.name) == shown_default(option), (
            f"docs/calibration.md states {calibration_doc.get(option.name)!r} as the default of `{option.name}`, "
            f"CalibrationOptions says {shown_default(option)!r}")
    assert flags_markdown_table() in cli_doc, (
        "docs/cli.md: the `paro calibrate` option table differs from CalibrationOptions; replace it with the output of "
        "python -c 'from paro_compile.calibration.options import flags_markdown_table as t; print(t())'")


def test_calibrate_flags_parse_lists_and_numbers():
    args = cli.build_parser().parse_args(["calibrate", MODEL, "--inputs", CALIB, "--orders", "FHW,HWF",
                                          "--step-boundaries", "400,800", "--dense-steps", "1", "--alpha", "0.5"])
    options = cli.calibration_options_from_args(args)
    assert options.orders == ["FHW", "HWF"] and options.step_boundaries == [800.0, 400.0]
    assert options.dense_steps == 1 and options.alpha == 0.5
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["calibrate", MODEL, "--inputs", CALIB, "--step-boundaries", "800,x"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["calibrate", MODEL, "--inputs", CALIB, "--step-buckets", "1.5"])


def test_calibrate_refuses_to_overwrite_without_force(workdir, monkeypatch, capsys):
    from paro_compile.plan import Plan

    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    existing = workdir / "existing.paro.safetensors"
    existing.write_bytes(b"keep me")
    # refused before the model is loaded: a broken model would exit 1
    assert cli.main(["calibrate", "cli_fixtures:broken_model", "--inputs", CALIB, "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --force to overwrite it" in err and err.startswith("paro calibrate: error: ")
    assert existing.read_bytes() == b"keep me"
    assert cli.main(["calibrate", MODEL, "--inputs", CALIB, "--density", "0.5", "--out", str(existing), "--force",
                     "-q"]) == 0
    assert sorted(Plan.load(existing).sites) == ["blocks.0.attn#0", "blocks.1.attn#0"]


SHADOWING = {
    "safetensors.py": "raise ImportError('the safetensors.py of the working directory was imported')\n",
    "user_factories.py": textwrap.dedent('''
        import safetensors  # the installed package, not the file next to this one
        from paro_compile.toy.dit import toy_model

        def model():
            return toy_model()
    '''),
}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P (no script directory on sys.path) needs Python 3.11")
def test_working_directory_does_not_shadow_installed_packages(tmp_path):
    """A console script has no working directory on sys.path: loading a factory from there must not let a local
    safetensors.py shadow the installed package."""
    for name, text in SHADOWING.items():
        (tmp_path / name).write_text(text)
    code = ("import sys\nfrom paro_compile import cli\nmodel = cli.load_model('user_factories:model')\n"
            "import safetensors.torch\nprint(type(model).__name__, safetensors.__file__)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    name, path = done.stdout.split()
    assert name == "ToyVideoDiT" and Path(path).parent.parent != tmp_path


def test_user_module_in_working_directory_is_loaded_before_an_installed_namesake(tmp_path, monkeypatch):
    """The named module itself comes from the working directory even where an installed module has its name."""
    (tmp_path / "rich.py").write_text("from paro_compile.toy.dit import toy_model as model\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "rich", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert cli.load_object("rich:model", "model").__name__ == "toy_model"
    monkeypatch.delitem(sys.modules, "rich")


ERRORS = textwrap.dedent('''
    import torch
    from paro_compile.toy.dit import toy_inputs

    def text_of_the_wrong_width():
        inputs = toy_inputs()
        inputs["text"] = torch.randn(1, 8, 7)
        return [inputs]
''')


def test_diff_dynamo_errors_come_out_as_one_clean_line(tmp_path):
    """A shape error surfaces while Dynamo traces the model: one line with the error and the model line, without
    Dynamo's boilerplate or torch's logged traceback."""
    (tmp_path / "error_fixtures.py").write_text(ERRORS)
    done = paro(tmp_path, "diff", MODEL, "--inputs", "error_fixtures:text_of_the_wrong_width", "-q")
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    line = lines[0]
    assert line.startswith("paro diff: error: compiling/running the model failed: RuntimeError: ")
    assert "toy/dit.py:" in line and "in forward]" in line
    for boilerplate in ("TORCHDYNAMO_VERBOSE", "Explanation", "from user code", "FakeTensor", "graph-break-site"):
        assert boilerplate not in line


def test_failure_message_keeps_paro_errors_and_unwraps_dynamo():
    from paro_compile.backend import UnsupportedAttentionError

    ours = UnsupportedAttentionError("2 attention site(s) cannot use paro attention:\n  a#0: x\n  b#0: y")
    wrapped = RuntimeError("backend='paro' raised:\n...\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace")
    wrapped.inner_exception = ours
    assert cli.failure_message(wrapped) == str(ours)
    assert cli.failure_message(ValueError("bad value\n  second line")) == "ValueError: bad value\n  second line"


def test_bench_failure_is_an_error_message_not_a_traceback(monkeypatch, capsys, tmp_path):
    script = tmp_path / "bench_attention.py"
    script.write_text("def main(argv):\n    raise RuntimeError('CUDA error: out of memory\\nCompile with TORCH_USE_CUDA_DSA')\n")
    monkeypatch.setattr(cli, "cuda_available", lambda: True)
    monkeypatch.setattr(cli, "find_bench_script", lambda: script)
    assert cli.main(["bench", "--quick"]) == 1
    assert capsys.readouterr().err == ("paro bench: error: the benchmark failed: RuntimeError: CUDA error: out of memory\n"
                                       "Compile with TORCH_USE_CUDA_DSA\n")


def test_tune_table_prints_paths_and_configs_as_text(monkeypatch, capsys, tmp_path):
    from paro_compile.kernels import attention, tuning

    cache = tmp_path / "cache[bold]x[/bold]"
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setattr(cli, "cuda_available", lambda: True)
    monkeypatch.setattr(tuning, "cache_dir", lambda: cache)
    monkeypatch.setattr(attention, "tune", lambda *a, **k: [{"shape": [1, 2, 64, 64], "density": 1.0, "dtype": "bfloat16",
                                                            "kwargs": {"order": "[red]tile[/red]"}, "tuned_now": False}])
    assert cli.main(["tune", "--shapes", "1,2,64,64"]) == 0
    out = capsys.readouterr().out
    assert '"[red]tile[/red]"' in out and str(cache) in out
