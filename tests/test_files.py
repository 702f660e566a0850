"""Files on disk: one writer per run directory, no stale temporaries, the umask respected, no profiler noise,
and finished sample grids and reports kept when nothing they were made from changed."""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import tiny_config
from tdcdiff.files import atomic_dir, atomic_write_bytes, remove_stale_temporaries
from tdcdiff.run import LOCK_FILE, OWNER_FILE, Run, RunDirectoryBusy, lock_run_dir

HOLDER = textwrap.dedent("""
    import sys
    from tdcdiff.run import lock_run_dir

    with lock_run_dir(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()  # hold the lock until the test closes our stdin
""")


def _ended_pid() -> str:
    """The pid of a process that has ended."""
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.fixture()
def held(tmp_path):
    """Another process holding tmp_path/run's lock: yields (run_dir, its pid, a function that ends it)."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())

    def end():
        holder.stdin.close()
        holder.wait()

    try:
        assert holder.stdout.readline() == "locked\n"  # waits until the lock is held, however slow the machine
        yield run_dir, holder.pid, end
    finally:
        if holder.poll() is None:
            end()


@pytest.mark.slow
def test_second_writer_is_refused_at_once_naming_the_holder(held):
    run_dir, pid, _ = held
    run = Run(run_dir, tiny_config(), progress=False)  # opening a run directory only reads it
    with pytest.raises(RunDirectoryBusy, match=rf"run directory {run_dir} is in use by process {pid} on .*; wait for "
                                               r"it to finish, or use another output directory \(--out\)"):
        run.train_base()
    with pytest.raises(RunDirectoryBusy, match=f"process {pid}"):
        run.plan()
    assert not (run_dir / "config.json").exists() and not (run_dir / "base").exists()


@pytest.mark.slow
def test_cli_second_writer_exits_2_with_one_line(held):
    run_dir, pid, _ = held
    done = subprocess.run([sys.executable, "-m", "tdcdiff.cli", "plan", "--out", str(run_dir), "--k", "0.9", "-q"],
                          capture_output=True, text=True, env=_env())
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: run directory {run_dir} is in use by process {pid}")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.fixture()
def held_copy(finished_run, tmp_path):
    """A copy of the finished run whose lock another process holds, with the half-written checkpoint a
    trainer would have there (`tdcdiff finetune --group 0` training again): (run_dir, its pid, that checkpoint)."""
    run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run.dir, copy, ignore=shutil.ignore_patterns(LOCK_FILE, OWNER_FILE))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(copy)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline() == "locked\n"
        checkpoint = copy / "finetune" / "group_0" / ".checkpoint.tdcdiff-tmp-k9zz_q1w"  # the holder's, mid-write
        checkpoint.mkdir()
        (checkpoint / "model.safetensors").write_bytes(b"half")
        yield copy, holder.pid, checkpoint
    finally:
        holder.stdin.close()
        holder.wait()


WRITERS = [["train-base"], ["plan"], ["prune"], ["finetune"], ["bundle"], ["report", "--num", "4"], ["run"],
           ["sample", "--num", "1", "--steps", "1"]]


@pytest.mark.slow
@pytest.mark.parametrize("command", WRITERS, ids=[c[0] for c in WRITERS])
def test_every_writing_stage_is_refused_while_another_writer_holds_the_run(held_copy, command):
    run_dir, pid, checkpoint = held_copy
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    done = subprocess.run([sys.executable, "-m", "tdcdiff.cli", *command, "--out", str(run_dir), "-q"],
                          capture_output=True, text=True, env=_env())
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: run directory {run_dir} is in use by process {pid}"), done.stderr
    assert (checkpoint / "model.safetensors").read_bytes() == b"half"  # the trainer's checkpoint survives
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


@pytest.mark.slow
def test_the_lock_is_free_once_its_holder_ends(held):
    run_dir, _, end = held
    with pytest.raises(RunDirectoryBusy):
        with lock_run_dir(run_dir):
            pass
    end()
    with lock_run_dir(run_dir):
        assert (run_dir / OWNER_FILE).read_text().startswith(f'{{"pid": {os.getpid()},')


@pytest.mark.slow
def test_settings_are_checked_again_once_the_lock_is_held(finished_run, tmp_path):
    """A writer opened before another one planned with other settings does not take that plan as its own."""
    run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run.dir, copy, ignore=shutil.ignore_patterns("plan", "prune", "finetune", "bundle", "samples",
                                                                 "report"))
    late = Run(copy, overrides={"k": 0.9}, progress=False)  # opened while no plan exists: k may still change
    Run(copy, progress=False).plan()  # meanwhile another writer plans with the saved k=0.4
    with pytest.raises(ValueError, match=r"setting 'k' differs from the one .* \(0.4 -> 0.9\) and stage 'plan' has"):
        late.plan()


def test_lock_is_reentrant_in_one_process_and_leaves_nothing_behind(tmp_path):
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir), lock_run_dir(run_dir):  # run_all -> report_for_run takes it again
        assert (run_dir / OWNER_FILE).read_text().startswith(f'{{"pid": {os.getpid()},')
    assert [p.name for p in run_dir.iterdir() if p.name != LOCK_FILE] == []


@pytest.mark.slow
def test_stale_temporaries_are_removed_when_a_stage_starts(finished_run, tmp_path):
    run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run.dir, copy)
    outputs = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    dead = _ended_pid()
    folders = [copy / f".bundle.tdcdiff-tmp-abc123_x-{dead}",  # atomic_dir killed while writing the bundle
               copy / f".base.tdcdiff-old-{'0a' * 16}-{dead}"]  # _replace killed after moving the old copy aside
    for folder in folders:
        (folder / "expert_0").mkdir(parents=True)
        (folder / "expert_0" / "model.safetensors").write_bytes(b"half")
    files = [copy / f".config.json.tdcdiff-x1y2z3ab-{dead}.tmp"]
    for file in files:
        file.write_bytes(b"half")
    # Not a dead writer's temporary of this folder: a live writer's, names without a pid, anything in a subfolder
    # (removed at the next write of its target instead: attack 2026-12-07c rows 144, 145).
    keep = [copy / ".hidden.tmp.notes", copy / "notes.tmp", copy / "samples" / "my.old-copy", copy / ".tmp-x",
            copy / ".cache.tmp-abc", copy / f".plan.tdcdiff-tmp-abcdefgh-{os.getpid()}", copy / "src" / ".main.py.tmp",
            copy / "finetune" / "group_0" / f".checkpoint.tdcdiff-tmp-k9zz_q1w-{dead}",
            # a user's names that only look like ours (attack 2026-12-07d rows 216, 270): no marker, or no such pid
            copy / f".x.tmp-mydata-{dead}", copy / f".notes.draft-{dead}.tmp",
            copy / f".bundle.tdcdiff-tmp-abc123_x-{10**12}"]
    for file in keep:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("mine")

    assert Run(copy, progress=False).export_bundle() == copy / "bundle"  # a stage with nothing left to do

    assert [p for p in folders + files if p.exists()] == []
    assert all(p.read_text() == "mine" for p in keep)
    assert {p: p.read_bytes() for p in outputs} == outputs


def test_remove_stale_temporaries_matches_what_killed_writers_leave(tmp_path, monkeypatch):
    import tdcdiff.files as files

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    real_rename, renames = os.rename, []

    def rename_then_die(src, dst):  # _replace: the old copy is moved aside, then the kill comes
        renames.append(src)
        if len(renames) > 1:
            raise KeyboardInterrupt
        real_rename(src, dst)

    (tmp_path / "model").mkdir()
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # a killed process cleans nothing up
    monkeypatch.setattr(os, "unlink", lambda *args, **kwargs: None)
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "plan.json", b"{}")
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "bundle") as tmp:
        (tmp / "manifest.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        files._replace(tmp_path / "new", tmp_path / "model")
    monkeypatch.undo()

    left = sorted(p.name for p in tmp_path.iterdir())
    assert [name.split(".")[1] for name in left] == ["bundle", "model", "plan"], left
    assert remove_stale_temporaries(tmp_path) == []  # their writer (this process) still runs
    dead = _ended_pid()
    for name in left:  # as the killed writer would have named them
        os.rename(tmp_path / name, tmp_path / name.replace(str(os.getpid()), dead))
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == [n.replace(str(os.getpid()), dead)
                                                                           for n in left]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)])
def test_written_files_respect_the_umask(tmp_path, umask, file_mode, dir_mode):
    from tdcdiff.models import build_unet
    from tdcdiff.serialization import save_model

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a" / "plan.json", b"{}")
        save_model(build_unet("digits-8"), tmp_path / "model")
    finally:
        os.umask(old)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a" / "plan.json") == file_mode
    assert mode(tmp_path / "model") == dir_mode
    assert {mode(p) for p in (tmp_path / "model").iterdir()} == {file_mode}


@pytest.mark.slow
def test_memory_measurement_prints_no_profiler_lines(tmp_path):
    """The CPU peak-memory probe (torch.profiler, behind every report) in a fresh process, as the CLI runs it."""
    script = textwrap.dedent("""
        import torch
        from tdcdiff.evaluate import _peak_forward_bytes
        from tdcdiff.models import build_unet

        peak = _peak_forward_bytes(build_unet("digits-8"), [999, 500], (1, 8, 8), 2, "cpu")
        print("peak", peak)
    """)
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 0  # the measurement still works
    assert "USDT" not in done.stdout + done.stderr and "profiler_st" not in done.stdout + done.stderr


def test_memory_measurement_prints_no_profiler_lines_in_process(capfd):
    from tdcdiff.evaluate import _peak_forward_bytes
    from tdcdiff.models import build_unet

    assert _peak_forward_bytes(build_unet("digits-8"), [999], (1, 8, 8), 2, "cpu") > 0
    out, err = capfd.readouterr()
    if os.environ.get("KINETO_LOG_LEVEL", "6") != "6":
        pytest.skip("the user set KINETO_LOG_LEVEL")
    assert "USDT" not in out + err


def _stamps(paths):
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


@pytest.mark.slow
def test_rerun_keeps_up_to_date_grids_and_report_and_redoes_changed_ones(finished_run, tmp_path):
    run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run.dir, copy)
    first = Run(copy, tiny_config(), progress=False).run_all()  # other tests may have remade the shared report
    grids = [copy / "samples" / "base.png", copy / "samples" / "tdc.png"]
    report = [copy / "report" / name for name in ("report.html", "results.json", "inputs.json")]
    assert first["samples"] == grids and first["report"] == report[0]
    before = _stamps(grids + report)

    again = Run(copy, tiny_config(), progress=False).run_all()
    assert _stamps(grids + report) == before  # not rewritten: same inode, same mtime
    assert again["samples"] == grids and again["report"] == report[0] and again["bundle"] == copy / "bundle"

    # the grids' size changed: they are redrawn; the report, not made from them, is kept
    assert Run(copy, tiny_config(num_samples=4), progress=False).run_all()["samples"] == grids
    assert all(_stamps([g])[g] != before[g] for g in grids)
    assert '"num_images": 4' in (copy / "samples" / "base.inputs.json").read_text()
    assert _stamps(report) == {p: before[p] for p in report}

    # an output changed behind the record's back is remade
    (copy / "report" / "results.json").write_text("{}")
    Run(copy, tiny_config(num_samples=4), progress=False).run_all()
    assert _stamps(report[:1]) != {report[0]: before[report[0]]}
    assert json.loads((copy / "report" / "results.json").read_text())["models"][1]["name"] == "TDC"


@pytest.mark.slow
def test_grid_replaced_by_something_else_is_redrawn(finished_run, tmp_path):
    """`tdcdiff sample` writes samples/base.png with its own settings: the record no longer matches it."""
    from tdcdiff.serialization import ARCHITECTURE_FILE
    from tdcdiff.train import FINAL_DIR

    run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run.dir, copy, ignore=shutil.ignore_patterns("report"))
    grid = copy / "samples" / "base.png"
    original = grid.read_bytes()
    grid.write_bytes(b"another grid")
    again = Run(copy, progress=False)
    assert again.sample_grid("base", again.base_model(), source=copy / "base" / FINAL_DIR / ARCHITECTURE_FILE) == grid
    assert grid.read_bytes() == original  # same weights, settings and seed: the same grid again


# -- an atomic directory write replaces only its own earlier output (attack 2026-12-07b row 121) ---------------
def test_save_bundle_into_a_folder_of_the_users_refuses_and_keeps_its_files(tmp_path):
    import torch

    from tdcdiff.bundle import save_bundle
    from tdcdiff.grouping import make_groups
    from tdcdiff.models import build_unet
    from tdcdiff.schedule import make_scheduler

    torch.manual_seed(0)
    scheduler = make_scheduler(1000)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"mine")

    def save(path):
        return save_bundle(path, [build_unet("digits-8")], make_groups("uniform", 1, scheduler), scheduler,
                           sample_shape=(1, 8, 8), expert_flops=[1], base_flops=1)

    with pytest.raises(ValueError, match=r"photos already exists and is not a tdcdiff bundle .*choose another path, "
                                         r"or delete it first"):
        save(folder)
    assert [p.name for p in folder.iterdir()] == ["holiday.jpg"] and (folder / "holiday.jpg").read_bytes() == b"mine"
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]  # no temporary left beside it
    bundle = save(tmp_path / "bundle")
    assert save(bundle) == bundle  # our own bundle, holding nothing else, is replaced
    (bundle / "note.txt").write_text("a bundle of ours, with the user's note added")
    with pytest.raises(ValueError, match=r"bundle already exists and holds note.txt besides the files of a "
                                         r"tdcdiff bundle"):
        save(bundle)  # the note would go with it (attack 2026-12-07c row 131)
    assert (bundle / "note.txt").read_text() == "a bundle of ours, with the user's note added"
    (tmp_path / "empty").mkdir()
    assert save(tmp_path / "empty").joinpath("manifest.json").exists()


def test_atomic_dir_replaces_only_what_its_caller_calls_its_own(tmp_path):
    from tdcdiff.files import holds

    (tmp_path / "a.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"a.txt already exists and is not empty; writing there would delete"):
        with atomic_dir(tmp_path / "a.txt") as tmp:
            (tmp / "x").write_text("new")
    model = tmp_path / "model"
    with atomic_dir(model, holds("x"), "a model") as tmp:
        (tmp / "x").write_text("1")
    with atomic_dir(model, holds("x"), "a model") as tmp:  # its own output: replaced whole
        (tmp / "x").write_text("2")
    assert [p.name for p in model.iterdir()] == ["x"] and (model / "x").read_text() == "2"
    (model / "y").write_text("the user's, added")
    with pytest.raises(ValueError, match=r"model already exists and holds y besides the files of a model; "
                                         r"writing there would delete them: move them out of it, or choose another "
                                         r"path$"):
        with atomic_dir(model, holds("x"), "a model") as tmp:
            raise AssertionError("never runs")
    (model / "y").unlink()
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match=r"thesis already exists and is not a model"):
        with atomic_dir(tmp_path / "thesis", holds("x"), "a model") as tmp:
            raise AssertionError("never runs")
    assert (tmp_path / "a.txt").read_text() == "mine" and (tmp_path / "thesis" / "thesis.tex").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "model", "thesis"]


# -- a tune directory is locked like a run directory (attack 2026-12-07b row 126) ------------------------------
@pytest.mark.slow
def test_a_second_tune_of_a_held_directory_is_refused_before_writing(held, finished_run):
    from tdcdiff.tune import Tune, TuneConfig

    tune_dir, pid, _ = held
    before = sorted(p.name for p in tune_dir.iterdir())
    done = subprocess.run([sys.executable, "-m", "tdcdiff.cli", "tune", "--out", str(tune_dir), "--base-from",
                           str(finished_run[0].dir), "-q"], capture_output=True, text=True, env=_env())
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith(f"error: tune directory {tune_dir} is in use by process {pid}"), done.stderr
    with pytest.raises(RunDirectoryBusy, match=rf"tune directory {tune_dir} is in use by process {pid}"):
        Tune(tune_dir, TuneConfig(), base_from=finished_run[0].dir, progress=False)  # copies the base: refused
    assert sorted(p.name for p in tune_dir.iterdir()) == before  # nothing written


# -- a killed writer's temporaries go at the next write (attack 2026-12-07b row 128) ----------------------------
def test_the_next_write_removes_what_a_killed_writer_left_and_keeps_a_live_ones(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has ended
    train = tmp_path / "candidates" / "uniform_0" / "train"
    train.mkdir(parents=True)
    left = [train / f".checkpoint.tdcdiff-tmp-k2j_x9ab-{dead}", train / f".log.json.tdcdiff-q8w2e_1a-{dead}.tmp",
            train / f".checkpoint.tdcdiff-old-{'a' * 32}-{dead}"]
    live = [train / f".checkpoint.tdcdiff-tmp-abcdefgh-{os.getpid()}", train / ".checkpoint.tdcdiff-tmp-nopid",
            train / f".checkpoint.tmp-mydata-{dead}"]  # a writer now, or unknown
    for path in left[::2] + live:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    left[1].write_bytes(b"half")
    with atomic_dir(train / "checkpoint", lambda d: True, "a checkpoint") as tmp:
        (tmp / "state.json").write_text("{}")
    assert [p for p in left if p.name.startswith(".checkpoint") and p.exists()] == []
    assert left[1].exists()  # another file's temporary: removed when that file is next written
    atomic_write_bytes(train / "log.json", b"{}")
    assert not left[1].exists() and all(p.exists() for p in live)
    assert sorted(p.name for p in train.iterdir() if p not in live) == ["checkpoint", "log.json"]


# -- a file-size limit or a quota while saving: one line, as a full disk (attack 2026-12-07b row 46) -----------
@pytest.mark.parametrize("code, message", [
    (27, r"file too large for this process's file-size limit \(`ulimit -f`\) or the file system while writing "
         r".*checkpoint; nothing was half-written there\. Raise the limit \(`ulimit -f unlimited`\)"),
    (122, r"disk quota exceeded while writing .*checkpoint; nothing was half-written there\. Free some space within "
          r"your quota"),
])
def test_a_file_size_limit_or_quota_while_saving_names_the_file(tmp_path, monkeypatch, code, message):
    import errno

    import safetensors.torch
    import torch

    from tdcdiff.train.checkpoint import save_checkpoint
    from tdcdiff.train.log import TrainingLog

    assert code == {27: errno.EFBIG, 122: errno.EDQUOT}[code]
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def limited(tensors, path, *args, **kwargs):  # what safetensors raises under `ulimit -f` (os error 27)
        raise safetensors.SafetensorError(f"Error while serializing: I/O error: File too large (os error {code})")

    monkeypatch.setattr(safetensors.torch, "save_file", limited)
    with pytest.raises(OSError, match=message) as caught:
        save_checkpoint(tmp_path, 1, 0.5, "f", model, optimizer, None, None)
    assert caught.value.errno == code and list(tmp_path.iterdir()) == []
    log = TrainingLog(tmp_path / "log.jsonl", 1000)
    monkeypatch.setattr(log.file, "write", lambda text: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    log.add(0.5, torch.tensor([3]), torch.tensor([0.5]))
    with pytest.raises(OSError, match=r"while writing .*log\.jsonl\. "):  # appended: may be half-written
        log.write(1, 0.1)
    log.close()


def test_a_real_file_size_limit_while_saving_a_checkpoint_is_one_line(tmp_path):
    script = textwrap.dedent("""
        import resource, sys, torch
        from pathlib import Path
        from tdcdiff.train.checkpoint import save_checkpoint
        model = torch.nn.Linear(64, 64)  # 16 KiB of weights: over the 4 KiB limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            save_checkpoint(Path(sys.argv[1]), 1, 0.5, "f", model, torch.optim.SGD(model.parameters(), lr=0.1),
                            None, None)
        except OSError as err:
            print(err.errno, err.strerror)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=_env())
    assert done.stdout.startswith("27 file too large for this process's file-size limit (`ulimit -f`) or the file "
                                  f"system while writing {tmp_path / 'checkpoint'}; nothing was half-written"), done
    assert list(tmp_path.iterdir()) == []


# -- a damaged JSON record of a run or tune directory is named with the fix (attack 2026-12-07b rows 40, 42) ----
def test_a_damaged_record_is_named_with_its_fix(tmp_path):
    from tdcdiff.report import expert_rows
    from tdcdiff.train.checkpoint import finished_summary
    from tdcdiff.tune.records import read_json

    prune = tmp_path / "prune"
    prune.mkdir()
    (prune / "summary_0.json").write_text("{")
    with pytest.raises(ValueError, match=rf"^{prune / 'summary_0.json'} is not valid JSON \(Expecting property name.*"
                                         rf"\); delete {prune} \(and the stages after it\) to prune again$"):
        expert_rows(tmp_path)
    (prune / "summary_0.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"summary_0.json holds a list, not an object: it was edited or damaged; "):
        expert_rows(tmp_path)
    (tmp_path / "final").mkdir()
    (tmp_path / "train.json").write_text("")
    with pytest.raises(ValueError, match=r"train.json is not valid JSON \(Expecting value.*\); delete .*train.json: "
                                         r"this stage is then trained again"):
        finished_summary(tmp_path, "f")
    (tmp_path / "result.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"result.json is not valid JSON .*; delete .*result.json: the tune makes it "
                                         r"again"):
        read_json(tmp_path / "result.json")


def test_a_damaged_training_log_is_named_and_a_cut_last_line_dropped(tmp_path):
    from tdcdiff.train.log import truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.9}\n{"step": 30, "lo')  # killed mid-line
    truncate_log(log, 20)
    assert log.read_text() == '{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.9}\n'
    log.write_text('{"step": 10, "loss": 1.0}\ngarbage\n')
    with pytest.raises(ValueError, match=rf"^{log} line 2 is not valid JSON \(Expecting value.*\); delete {log} "
                                         r"\(the loss log; training resumes from its checkpoint without its earlier "
                                         r"lines\)$"):
        truncate_log(log, 20)
    log.write_text('[10]\n')
    with pytest.raises(ValueError, match=r"log.jsonl line 1 is not a log record"):
        truncate_log(log, 20)


# -- a folder is replaced only when everything in it is our earlier output (attack 2026-12-07c rows 131-134) ----
def _saved_model(path):
    from tdcdiff.models import build_unet
    from tdcdiff.serialization import save_model

    return save_model(build_unet("digits-8"), path)


def test_save_model_refuses_a_model_folder_holding_the_users_files(tmp_path):
    from tdcdiff.models import build_unet
    from tdcdiff.serialization import save_model

    model = tmp_path / "m"
    _saved_model(model)
    _saved_model(model)  # our own output, nothing else: replaced
    (model / "README.md").write_text("mine")  # row 133
    with pytest.raises(ValueError, match=r"m already exists and holds README.md besides the files of a saved model "
                                         r"\(with architecture.json and model.safetensors\); writing there would "
                                         r"delete them: move them out of it, or choose another path$"):
        save_model(build_unet("digits-8"), model)
    assert (model / "README.md").read_text() == "mine"
    fake = tmp_path / "fake"  # row 134: our file names, but not our content
    fake.mkdir()
    for name in ("architecture.json", "model.safetensors", "data.csv"):
        (fake / name).write_text("")
    with pytest.raises(ValueError, match=r"fake already exists and is not a saved model .*delete it first$"):
        save_model(build_unet("digits-8"), fake)
    assert sorted(p.name for p in fake.iterdir()) == ["architecture.json", "data.csv", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake", "m"]  # no temporary left


def test_a_manifest_of_another_format_or_unlisted_files_keep_a_folder(tmp_path):
    from tdcdiff.manifest import A_BUNDLE, is_bundle

    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "tdcdiff-bundle/999", "files": {}}))  # row 132
    (folder / "thesis.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"p already exists and is not a tdcdiff bundle"):
        with atomic_dir(folder, is_bundle, A_BUNDLE):
            raise AssertionError("never runs")
    listing = {"expert_0/model.safetensors": {}, "expert_0/architecture.json": {}}
    (folder / "manifest.json").write_text(json.dumps({"format": "tdcdiff-bundle/2", "files": listing}))
    (folder / "expert_0").mkdir()
    (folder / "expert_0" / "model.safetensors").write_text("w")
    (folder / "expert_0" / "notes").mkdir()
    (folder / "figs").mkdir()
    (folder / "figs" / "f.png").write_text("mine")
    with pytest.raises(ValueError, match=r"p already exists and holds figs/, thesis.txt, expert_0/notes/ besides "
                                         r"the files of a tdcdiff bundle"):
        with atomic_dir(folder, is_bundle, A_BUNDLE):
            raise AssertionError("never runs")
    for extra in ("thesis.txt", "figs/f.png", "figs", "expert_0/notes"):
        (folder / extra).rmdir() if (folder / extra).is_dir() else (folder / extra).unlink()
    with atomic_dir(folder, is_bundle, A_BUNDLE) as tmp:  # exactly what the manifest lists: ours, replaced
        (tmp / "manifest.json").write_text("{}")
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]


def test_a_checkpoint_folder_with_the_users_file_is_refused(tmp_path):
    from tdcdiff.train.checkpoint import A_CHECKPOINT, CHECKPOINT_FILES

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for name in ("state.json", "model.safetensors", "ema.safetensors", "mine.txt"):
        (folder / name).write_text("{}")
    with pytest.raises(ValueError, match=r"checkpoint already exists and holds mine.txt besides the files of a "
                                         r"training checkpoint"):
        with atomic_dir(folder, CHECKPOINT_FILES, A_CHECKPOINT):
            raise AssertionError("never runs")
    (folder / "mine.txt").unlink()
    with atomic_dir(folder, CHECKPOINT_FILES, A_CHECKPOINT) as tmp:
        (tmp / "state.json").write_text("{}")
    assert [p.name for p in folder.iterdir()] == ["state.json"]


# -- a symlink to a folder is written through, the link kept (attack 2026-12-07c row 135) ----------------------
def test_atomic_dir_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    from tdcdiff.files import holds

    shared = tmp_path / "shared" / "model"
    with atomic_dir(shared, holds("x"), "a model") as tmp:
        (tmp / "x").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(shared, target_is_directory=True)
    with atomic_dir(link, holds("x"), "a model") as tmp:
        (tmp / "x").write_text("new")
    assert link.is_symlink() and (shared / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "shared"]
    assert [p.name for p in shared.parent.iterdir()] == ["model"]


# -- the stale-temporary sweep removes only a dead writer's, in the folder itself (2026-12-07c rows 144, 145) ---
def test_the_lock_sweep_keeps_user_files_live_writers_and_subfolders(tmp_path):
    dead = _ended_pid()
    proj = tmp_path / "proj"
    mine = [proj / "paper.tex", proj / "src" / ".main.py.tmp", proj / ".git" / ".index.lock.tmp",
            proj / ".cache.tmp-abc" / "blob", proj / ".notes.txt.tmp",
            proj / "tune" / "candidates" / "00-single" / "train"
            / f".checkpoint.tdcdiff-tmp-abcd1234-{os.getpid()}" / "m",
            proj / "tune" / f".tune.json.tdcdiff-abcd1234-{dead}.tmp",  # a nested tune's: its own lock sweeps it
            proj / f".config.json.tdcdiff-ab12cd34-{os.getpid()}.tmp"]  # a live writer's
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    stale = [proj / f".config.json.tdcdiff-ab12cd34-{dead}.tmp", proj / f".base.tdcdiff-tmp-abcd1234-{dead}",
             proj / f".base.tdcdiff-old-{'0f' * 16}-{dead}"]
    stale[0].write_text("half")
    for folder in stale[1:]:
        (folder / "expert_0").mkdir(parents=True)
    with lock_run_dir(proj):
        pass
    assert [p for p in stale if p.exists()] == []
    assert all(p.read_text() == "mine" for p in mine)


# -- train() checks the folders it will replace before its first step (attack 2026-12-07c row 141) -------------
@pytest.mark.parametrize("folder", ["final", "checkpoint"])
def test_train_into_a_final_or_checkpoint_folder_of_the_users_refuses_before_training(tmp_path, digits, scheduler,
                                                                                      tiny_unet, folder):
    from tdcdiff.train import TrainConfig, train

    (tmp_path / folder).mkdir()
    (tmp_path / folder / "mine.txt").write_text("mine")
    what = "a saved model" if folder == "final" else "a training checkpoint"
    with pytest.raises(ValueError, match=rf"{folder} already exists and is not {what}"):
        train(tiny_unet, digits.images, scheduler, TrainConfig(steps=2, batch_size=8), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == [folder, "mine.txt"]  # no log, no checkpoint written


# -- a run command on a tune directory says it is one (attack 2026-12-07c row 147) -----------------------------
@pytest.mark.parametrize("command", [["run"], ["sample", "--num", "1"], ["report"]])
@pytest.mark.parametrize("record", ["tune.json", "candidates.json"])
def test_a_run_command_on_a_tune_directory_names_it(tmp_path, command, record):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    tune = tmp_path / "t"
    (tune / "base" / "base").mkdir(parents=True)  # the tune's base run, as `tdcdiff tune` makes it
    (tune / record).write_text("{}")
    before = sorted(tune.rglob("*"))
    result = CliRunner().invoke(app, [*command, "--out", str(tune)])
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: {tune} is a tdcdiff tune directory (it holds {record}), not a run directory: "
                             f"to continue that tune use `tdcdiff tune --out {tune}`; for a run, use another output "
                             "directory (--out)\n")
    assert sorted(p for p in tune.rglob("*") if p.name != LOCK_FILE) == before  # `report` takes the lock first


def test_save_bundle_through_a_symlink_updates_the_linked_bundle(tmp_path):
    import torch

    from tdcdiff.bundle import save_bundle
    from tdcdiff.grouping import make_groups
    from tdcdiff.models import build_unet
    from tdcdiff.schedule import make_scheduler

    torch.manual_seed(0)
    scheduler = make_scheduler(1000)

    def save(path, flops):
        return save_bundle(path, [build_unet("digits-8")], make_groups("uniform", 1, scheduler), scheduler,
                           sample_shape=(1, 8, 8), expert_flops=[flops], base_flops=flops)

    shared = tmp_path / "shared" / "bundle"
    save(shared, 1)
    link = tmp_path / "bundle"
    link.symlink_to(shared, target_is_directory=True)
    assert save(link, 2) == link
    assert link.is_symlink() and json.loads((shared / "manifest.json").read_text())["expert_flops"] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "shared"]


def test_the_refusal_names_the_first_few_entries_in_the_way(tmp_path):
    from tdcdiff.files import holds

    model = tmp_path / "model"
    model.mkdir()
    (model / "x").write_text("ours")
    for i in range(7):
        (model / f"mine_{i}.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"model already exists and holds mine_0.txt, mine_1.txt, mine_2.txt, "
                                         r"mine_3.txt, mine_4.txt and 2 more besides the files of a model;"):
        with atomic_dir(model, holds("x"), "a model"):
            raise AssertionError("never runs")
    assert len(list(model.iterdir())) == 8


# -- every atomic writer checks its path before any work (attack 2026-12-07d rows 212, 214, 215) --------------
def _writers():
    import torch

    from tdcdiff.bundle import save_bundle
    from tdcdiff.files import atomic_write_text
    from tdcdiff.grouping import make_groups
    from tdcdiff.models import build_unet
    from tdcdiff.schedule import make_scheduler
    from tdcdiff.serialization import save_model

    torch.manual_seed(0)
    scheduler, unet = make_scheduler(1000), build_unet("digits-8")
    return {"save_bundle": lambda p: save_bundle(p, [unet], make_groups("uniform", 1, scheduler), scheduler,
                                                 sample_shape=(1, 8, 8), expert_flops=[1], base_flops=1),
            "save_model": lambda p: save_model(unet, p),
            "atomic_write_text": lambda p: atomic_write_text(p, "x")}


@pytest.mark.parametrize("writer", ["save_bundle", "save_model", "atomic_write_text"])
def test_a_path_under_a_file_or_empty_is_refused_before_any_work(tmp_path, monkeypatch, writer):
    write = _writers()[writer]
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(ValueError) as under_a_file:
        write(tmp_path / "afile" / "b")
    assert str(under_a_file.value) == (f"{tmp_path}/afile/b cannot be created: {tmp_path}/afile is a file; choose "
                                       "another path")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as relative:  # named as given
        write("afile/c/d")
    assert str(relative.value) == "afile/c/d cannot be created: afile is a file; choose another path"
    for empty in ["", "  "]:
        with pytest.raises(ValueError) as nothing:
            write(empty)
        assert str(nothing.value) == f"path is empty; give {'a file' if writer == 'atomic_write_text' else 'a folder'}"
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("writer", ["save_bundle", "save_model"])
def test_the_current_directory_is_refused_before_any_work_and_a_new_folder_in_it_written(tmp_path, monkeypatch,
                                                                                        writer):
    write = _writers()[writer]
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for path in [".", "..", "../empty"]:  # replacing the folder whole would leave the process in a deleted one
        with pytest.raises(ValueError) as current:
            write(path)
        shown = {".": empty, "..": tmp_path}.get(path, path)  # "." and ".." resolved, others as given
        assert str(current.value) == (f"{shown} is or holds the current directory, which this write would replace "
                                      f"whole; give a new folder inside it (e.g. {shown}/out), or choose another "
                                      "path")
    assert list(empty.iterdir()) == [] and os.getcwd() == str(empty)
    write("out")
    assert (empty / "out" / ("manifest.json" if writer == "save_bundle" else "architecture.json")).is_file()
    assert [p.name for p in empty.iterdir()] == ["out"]


# -- a tune on a run directory says it is one, before any write (attack 2026-12-07d row 290) ----------------------
@pytest.mark.parametrize("made", ["config.json", "plan", "bundle"])
@pytest.mark.parametrize("flags", [[], ["--dry-run"], ["--candidate", "0"]])
def test_a_tune_on_a_run_directory_names_it(tmp_path, made, flags):
    from typer.testing import CliRunner

    from tdcdiff.cli import app
    from tdcdiff.run import check_not_a_run

    run = tmp_path / "r"
    (run / "base" / "final").mkdir(parents=True)
    (run / made).write_text("{}") if made.endswith(".json") else (run / made).mkdir()
    before = sorted(run.rglob("*"))
    result = CliRunner().invoke(app, ["tune", "--out", str(run), *flags])
    assert result.exit_code == 2, result.output
    shown = made if made.endswith(".json") else made + "/"
    assert result.output == (f"error: {run} is a tdcdiff run directory (it holds {shown}), not a tune directory: a "
                             "tune there would mix its files into the run; use another --out (to tune from that "
                             f"run's base model, give --base-from {run})\n")
    assert sorted(run.rglob("*")) == before
    from tdcdiff.tune import Tune

    with pytest.raises(ValueError, match="is a tdcdiff run directory"):  # the Python API too
        Tune(run, progress=False)
    assert sorted(run.rglob("*")) == before
    tune = tmp_path / "t"  # a tune directory: its base/ is its base run, with that run's config.json
    (tune / "base" / "base").mkdir(parents=True)
    (tune / "base" / "config.json").write_text("{}")
    (tune / "tune.json").write_text("{}")
    check_not_a_run(tune)


# -- a symlink loop or to nothing, a name or path too long, a file system refusing mkdir (/proc): one ValueError
# naming the path and the fix, before any work, from every atomic writer (attack 2026-12-07f rows 533, 534, 536, 537)
@pytest.mark.parametrize("writer", ["save_bundle", "save_model", "atomic_write_text"])
def test_unusable_output_paths_are_named_before_any_work(tmp_path, monkeypatch, writer):
    write, folder = _writers()[writer], writer != "atomic_write_text"
    monkeypatch.chdir(tmp_path)
    os.symlink("loop", "loop")
    os.symlink("nowhere/deeper", "dangling")
    cases = {"loop/x": "loop/x cannot be created: loop is a symlink loop (loop -> loop, which leads back to itself); "
                       "choose another path",
             "n" * 300: f"{'n' * 120}... (300 characters) is too long for the file system (File name too long); "
                        "choose a shorter path",
             "/".join(["d" * 200] * 25): f"{'d' * 120}... (5024 characters) is too long for the file system (File "
                                         "name too long); choose a shorter path",
             "m" * 240: f"{'m' * 120}... (240 characters) cannot be created: its name is 240 bytes, "
                        f"{294 if folder else 270} with the temporary name a write gives it first; the file system "
                        "allows at most 255 per name: choose a shorter name"}
    if folder:  # a file write replaces a link (os.replace), as it replaces a file
        cases |= {"loop": "loop is a symlink loop (loop -> loop, which leads back to itself): nothing can be written "
                          "through it; fix or remove the link, or choose another path",
                  "dangling": "dangling is a symlink to nowhere/deeper, which does not exist: nothing can be written "
                              "through it; fix or remove the link, or choose another path"}
    if Path("/proc/self").is_dir() and os.access("/proc", os.W_OK):  # procfs as root: access says yes, mkdir no
        cases["/proc/x"] = ("/proc/x cannot be written: /proc refuses new entries (No such file or directory: a "
                            "pseudo file system such as /proc or /sys, or a read-only one); choose another path")
    for path, message in cases.items():
        with pytest.raises(ValueError) as refused:
            write(path)
        assert str(refused.value) == message, path
    assert sorted(os.listdir(tmp_path)) == ["dangling", "loop"]  # nothing written, no temporary left
    assert not Path("/proc/x").exists()


def test_check_replaceable_says_a_dangling_link_is_one(tmp_path):
    from tdcdiff.files import check_replaceable

    (tmp_path / "final").symlink_to(tmp_path / "gone")  # e.g. train()'s out_dir/final
    with pytest.raises(ValueError) as refused:
        check_replaceable(tmp_path / "final", None, "a saved model, nor empty")
    assert str(refused.value) == (f"{tmp_path}/final is a symlink to {tmp_path}/gone, which does not exist, not a "
                                  "saved model: nothing can be written through it; fix or remove the link, or choose "
                                  "another path")


# -- one rule for a run's or tune's --out: missing, empty or a folder of the same kind, its path writable; --dry-run
# refuses what the run refuses (attack 2026-12-07f rows 533, 541, 620-623) ----------------------------------------
def _outs(tmp_path):
    """{--out: the message after "error: "} for run and tune (None: the tune's differs, see below)."""
    os.symlink("loop", tmp_path / "loop")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    (tmp_path / "afile").write_text("mine")
    from tdcdiff.manifest import FORMAT

    (tmp_path / "b").mkdir()  # a bundle: its manifest.json, told by its format (attack 2026-12-07g row 708)
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": {}}))
    for model in (tmp_path / "m", tmp_path / "r" / "base" / "final"):  # a saved model; a run's stage-1 output
        model.mkdir(parents=True)
        (model / "architecture.json").write_text('{"class": "UNet2DModel"}')
        (model / "model.safetensors").write_text("")
    (tmp_path / "r" / "config.json").write_text("{}")  # a run, and a stage folder of it
    (tmp_path / "r" / "plan").mkdir()
    (tmp_path / "r" / "plan" / "plan.json").write_text("{}")
    mixed = "not a {what}: a {kind} there would mix its files into it; use a new or empty --out"
    return {"loop": f"--out {tmp_path}/loop is a symlink loop ({tmp_path}/loop -> loop, which leads back to "
                    "itself): nothing can be written through it; fix or remove the link, or choose another --out",
            "dangling": f"--out {tmp_path}/dangling is a symlink to {tmp_path}/nowhere, which does not exist: nothing "
                        "can be written through it; fix or remove the link, or choose another --out",
            "afile": f"--out {tmp_path}/afile is a file, not a directory; choose another --out",
            "b": f"--out {tmp_path}/b is a tdcdiff bundle (it holds manifest.json), {mixed}",
            "m": f"--out {tmp_path}/m is a saved model (it holds architecture.json), {mixed}",
            "r/base": f"--out {tmp_path}/r/base is a training output folder, such as a run's base/ (it holds final/), "
                      f"{mixed}",
            "r/plan": f"--out {tmp_path}/r/plan is the plan/ stage folder of run {tmp_path}/r, {mixed}"}


@pytest.mark.parametrize("command", ["run", "tune"])
def test_an_out_of_another_kind_is_refused_before_any_work_also_by_a_dry_run(tmp_path, command):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    outs = _outs(tmp_path)
    what, kind = {"run": ("run directory", "run"), "tune": ("tune directory", "tune")}[command]
    before = sorted(tmp_path.rglob("*"))
    for out, message in outs.items():
        for flags in [["--dry-run"], []]:
            result = CliRunner().invoke(app, [command, "--out", str(tmp_path / out), "--base-steps", "1", *flags])
            assert result.exit_code == 2, (out, flags, result.output)
            assert result.output == f"error: {message.format(what=what, kind=kind)}\n", (out, flags)
    empty = CliRunner().invoke(app, [command, "--out", "", "--dry-run"])  # not the current folder (row 620)
    assert empty.exit_code == 2 and empty.output == (f"error: --out is empty; give the {what}, e.g. --out "
                                                     f"runs/{'digits' if command == 'run' else 'tune'}\n")
    assert sorted(tmp_path.rglob("*")) == before


def test_the_api_refuses_the_same_outs_before_any_write(tmp_path):
    from tdcdiff.run.rundir import check_out_dir
    from tdcdiff.tune import Tune, TuneConfig, check_tune

    outs = _outs(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    for out, message in outs.items():
        expected = message.replace("--out ", "").replace("another --out", "another path" if out in ("loop", "dangling")
                                                         else "another directory").replace("empty --out",
                                                                                           "empty directory")
        for what, kind, calls in [("tune directory", "tune", [lambda p: Tune(p, progress=False),
                                                              lambda p: check_tune(p, TuneConfig())]),
                                  ("run directory", "run", [lambda p: Run(p, progress=False).train_base()])]:
            for call in calls:
                with pytest.raises(ValueError) as refused:
                    call(tmp_path / out)
                assert str(refused.value) == expected.format(what=what, kind=kind), (out, what)
    for make in (lambda: Tune("", progress=False), lambda: Run(" ", progress=False)):  # Path("") would be "."
        with pytest.raises(ValueError, match=r"^path is empty; give a folder$"):
            make()
    assert sorted(tmp_path.rglob("*")) == before
    check_out_dir(tmp_path / "r", "run directory")  # the same kind, or a new folder
    check_out_dir(tmp_path / "new" / "t", "tune directory")


def test_sample_output_too_long_or_under_proc_is_named_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    monkeypatch.chdir(tmp_path)
    name = "n" * 300 + ".png"
    result = CliRunner().invoke(app, ["sample", "--bundle", "/no/such/bundle", "--output", name])
    assert result.exit_code == 2 and result.output == (f"error: --output {'n' * 120}... (304 characters) is too long "
                                                       "for the file system (File name too long); choose a shorter "
                                                       "path\n"), result.output
    if Path("/proc/self").is_dir() and os.access("/proc", os.W_OK):  # procfs as root
        result = CliRunner().invoke(app, ["sample", "--bundle", "/no/such/bundle", "--output", "/proc/x.png"])
        assert result.output == ("error: --output /proc/x.png cannot be written: /proc refuses new entries (No such "
                                 "file or directory: a pseudo file system such as /proc or /sys, or a read-only one); "
                                 "choose another --output\n")
    assert list(tmp_path.iterdir()) == []
