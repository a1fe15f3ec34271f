"""Screenshot a sweep's parent run as people see it: the real MLflow UI in headless Chromium.

    python scripts/ui_screenshot.py --backend-store-uri sqlite:///$PWD/mlruns/mlflow.db -o run.png

Starts ``mlflow server`` (this interpreter's, one worker) on a free 127.0.0.1 port, opens the
parent run's page (the newest run tagged ``lstm_sweep.role = sweep`` unless ``--run-id`` says
which) in Debian's ``/usr/bin/chromium`` (``apt-get install -y chromium``), waits until the
page has rendered and saves a PNG.
``--page experiment`` shoots the experiment's page instead, ``--artifact report/x.png`` the run's
Artifacts tab with that file open; ``--workflow-type`` opens the page in the UI's GenAI or Model
training view, as the sidebar's switch would (by default the UI picks as it does for a person who
has never switched: GenAI in MLflow 3.17, whatever the experiment's ``mlflow.experimentKind``).

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``, file
descriptors 3 and 4), so nothing but the MLflow server listens on a port and no package beyond
the standard library and MLflow is needed. Rendering is awaited, not slept for: the page counts
as drawn once the run's name and the start of its description (the experiment's name on the
experiment page, the file's path on the Artifacts tab) are visible text, no spinner or skeleton
is showing, every image in view and every font has loaded, and the DOM has not changed for
0.75 s. The UI fetches its data by several API calls after its bundle has loaded, at speeds
that vary; a fixed sleep or Chromium's ``--screenshot --virtual-time-budget`` shoots whatever
is there when the time is up and cannot tell the run page from a spinner or an error page.

Exit status: 0 with the screenshot written, 2 on bad input (no such store, no parent run),
1 when the server or the browser fails or the page never settles (the screenshot is still
written then, to show how far it got).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

CHROMIUM = "/usr/bin/chromium"
SWEEP_FILTER = "tags.`lstm_sweep.role` = 'sweep'"
SERVER_START_SECONDS = 90.0
RENDER_SECONDS = 60.0
QUIET_MS = 750  # React re-renders in bursts as each API call returns; this outlasts a gap
POLL_SECONDS = 0.25
PROTOCOL_SECONDS = 30.0  # one DevTools command; screenshots of a tall page take a while

# Chromium's defaults call home (component updates, sync, field trials); on a closed network
# those connections are refused and can stall start-up, so they are switched off.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # the sandbox refuses to run as root, and containers lack what it needs
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
]

# Evaluated in the page every poll. Installs a MutationObserver on first use so that "the DOM
# has been still for QUIET_MS" can be measured without a fixed sleep. Spinners and skeletons are
# MLflow's design system's (antd-based) loading states plus the ARIA ones any component uses.
PAGE_STATE_JS = """
(() => {
  if (!window.__uiShot) {
    window.__uiShot = {last: performance.now()};
    new MutationObserver(() => { window.__uiShot.last = performance.now(); })
      .observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
  }
  const text = (document.body ? document.body.innerText : '').replace(/[^\\p{L}\\p{N}]/gu, '');
  const loading = [...document.querySelectorAll(
    '[aria-busy="true"], [role="progressbar"], .ant-spin-spinning, .ant-skeleton-active, ' +
    '[class*="skeleton" i], [class*="spinner" i], [data-testid*="spinner" i]'
  )].filter(el => el.getClientRects().length > 0).length;
  return {
    href: location.href,
    missing: NEEDLES.map((needle, i) => text.includes(needle) ? -1 : i).filter(i => i >= 0),
    loading: loading,
    images: [...document.images].filter(img => {  // lazy images out of view never load
      const box = img.getBoundingClientRect();
      return !img.complete && box.bottom > 0 && box.top < innerHeight && box.width > 0;
    }).length,
    fonts: document.fonts.status,
    quietMs: performance.now() - window.__uiShot.last,
  };
})()
"""

# The run page shows a long description folded behind "Show more"; unfolding it is a click a
# person makes, so it is done only when asked (--expand-description).
EXPAND_DESCRIPTION_JS = """
(() => {
  const buttons = [...document.querySelectorAll('button, [role="button"], a')]
    .filter(el => el.innerText.trim().toLowerCase() === 'show more');
  buttons.forEach(el => el.click());
  window.__uiShot.last = performance.now();  // the quiet period restarts at the click
  return buttons.length;
})()
"""


class BadInput(Exception):
    """The user's arguments name nothing to show: exit status 2."""


class Failure(Exception):
    """The server, the browser or the page let us down: exit status 1."""


@dataclass(frozen=True)
class Target:
    experiment_id: str
    experiment_name: str
    run_id: str
    run_name: str
    description: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Screenshot a sweep's parent run in the MLflow UI (headless Chromium).",
    )
    parser.add_argument(
        "--backend-store-uri",
        required=True,
        help="the tracking store, e.g. sqlite:///$PWD/mlruns/mlflow.db",
    )
    parser.add_argument(
        "--artifacts-destination",
        help="where the server resolves mlflow-artifacts:/ locations (not needed for the "
        "local stores lstm_sweep writes, whose experiments keep file:// locations)",
    )
    parser.add_argument("--experiment", help="experiment name (default: search all)")
    parser.add_argument("--run-id", help="the run to show (default: the newest sweep run)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="PNG to write")
    parser.add_argument("--width", type=int, default=1400, help="viewport width in CSS pixels")
    parser.add_argument("--height", type=int, default=1800, help="viewport height in CSS pixels")
    parser.add_argument(
        "--page",
        choices=["run", "artifacts", "experiment"],
        default="run",
        help="the run's page (default), its Artifacts tab or its experiment's page",
    )
    parser.add_argument(
        "--artifact",
        metavar="PATH",
        help="the artifact to open in the Artifacts tab, e.g. report/history.png "
        "(implies --page artifacts)",
    )
    parser.add_argument(
        "--workflow-type",
        choices=["genai", "machine_learning"],
        help="open the UI in this view (the sidebar's GenAI / Model training switch); default: "
        "whatever the UI chooses for a first-time visitor",
    )
    parser.add_argument(
        "--expand-description",
        action="store_true",
        help="click the description's 'Show more' before the screenshot",
    )
    args = parser.parse_args(argv)
    if args.artifact is not None:
        if args.page == "experiment":
            parser.error("--artifact shows a run's artifact: not with --page experiment")
        args.page = "artifacts"
    if args.expand_description and args.page != "run":
        parser.error(
            f"--expand-description unfolds the run page's description: not with --page {args.page}"
        )
    if args.width < 200 or args.height < 200:
        parser.error("--width and --height must be at least 200")
    return args


def normalise_store_uri(uri: str) -> str:
    """Make a SQLite URI absolute (the server runs in a scratch directory) and check it is a store.

    Opening a missing or foreign SQLite file with MLflow would create MLflow's tables in it, so
    the file is checked read-only first.
    """
    if not uri.startswith("sqlite:///"):
        return uri  # a database server: MLflow reports what is wrong with it
    path = Path(unquote(uri.removeprefix("sqlite:///"))).resolve()
    if not path.is_file():
        raise BadInput(f"no such store: {path}")
    try:
        with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
            db.execute("SELECT 1 FROM experiments LIMIT 1").fetchall()
    except sqlite3.Error:
        raise BadInput(f"not an MLflow store: {path}") from None
    return f"sqlite:///{path}"


def masked(uri: str) -> str:
    """A store URI fit to print: a database server's password hidden."""
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", uri)


def find_target(store_uri: str, experiment: str | None, run_id: str | None) -> Target:
    """The run to show: the one asked for, else the newest sweep (parent) run."""
    try:
        return read_target(store_uri, experiment, run_id)
    except BadInput:
        raise
    except Exception as error:  # any driver or store error means the same: no store to show
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise BadInput(f"cannot read {masked(store_uri)}: {reason}") from None


def read_target(store_uri: str, experiment: str | None, run_id: str | None) -> Target:
    from mlflow import MlflowClient  # slow to import: only once the arguments are known good
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=store_uri)
    experiment_ids: list[str] | None = None
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise BadInput(f"no experiment named {experiment!r} in {masked(store_uri)}")
        experiment_ids = [found.experiment_id]

    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise BadInput(f"no run {run_id} in {masked(store_uri)}") from None
        if experiment_ids is not None and run.info.experiment_id not in experiment_ids:
            raise BadInput(f"run {run_id} is not in experiment {experiment!r}")
    else:
        if experiment_ids is None:
            experiment_ids = [e.experiment_id for e in client.search_experiments()]
        runs = (
            client.search_runs(
                experiment_ids,
                filter_string=SWEEP_FILTER,
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if experiment_ids
            else []
        )
        if not runs:
            where = f"experiment {experiment!r}" if experiment else masked(store_uri)
            raise BadInput(f"no parent run (tag lstm_sweep.role = sweep) in {where}")
        run = runs[0]

    return Target(
        experiment_id=run.info.experiment_id,
        experiment_name=client.get_experiment(run.info.experiment_id).name,
        run_id=run.info.run_id,
        run_name=run.info.run_name or run.info.run_id,
        description=run.data.tags.get("mlflow.note.content", ""),
    )


def squash(text: str) -> str:
    """Letters and digits only: how needles and the page's text are compared.

    Markdown turns emphasis, code spans, table bars and line breaks into formatting, so the
    words survive rendering but the punctuation and spacing around them do not.
    """
    return "".join(ch for ch in text if ch.isalnum())


def description_start(markdown: str, length: int = 40) -> str:
    """The start of the first line of a Markdown text that shows any words, squashed."""
    for line in markdown.splitlines():
        line = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", line)  # an image shows no text
        line = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line)  # a link shows its text
        line = re.sub(r"<[^>]*>", "", line)  # HTML tags
        line = re.sub(r"^\s*\d+[.)]\s", "", line)  # an ordered list's number is CSS, not text
        if squash(line):
            return squash(line)[:length]
    return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """End a process we started and everything it started (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    with suppress(ProcessLookupError):  # children that outlive the leader keep the group alive
        os.killpg(proc.pid, signal.SIGKILL)


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("  " + line for line in text)


@contextmanager
def mlflow_server(
    store_uri: str, artifacts_destination: str | None, workdir: Path
) -> Iterator[str]:
    """A loopback ``mlflow server`` on a free port; yields its base URL, stops it on exit."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if artifacts_destination is None:
        # Runs with file:// artifact locations are read straight from disk whatever this flag
        # says; proxying is off so the server does not adopt ./mlartifacts as a destination.
        command.append("--no-serve-artifacts")
    else:
        command += ["--artifacts-destination", artifacts_destination]
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # A viewer needs no job runner: it would start seven huey consumer processes and leave
        # a queue directory in /dev/shm behind.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = workdir / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own process group, so stop_group reaches uvicorn too
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if proc.poll() is not None:
                raise Failure(f"mlflow server exited with {proc.returncode}:\n{tail(log)}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise Failure(
                    f"mlflow server not healthy in {SERVER_START_SECONDS:.0f}s:\n{tail(log)}"
                )
            time.sleep(0.5)
        yield base
    finally:
        stop_group(proc)


class DevTools:
    """The Chrome DevTools protocol over Chromium's pipe: NUL-terminated JSON messages."""

    def __init__(self, send_fd: int, receive_fd: int) -> None:
        self.send_fd = send_fd
        self.receive_fd = receive_fd
        self.buffer = b""
        self.next_id = 0

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self.send_fd, data) :]
        except BrokenPipeError:
            raise Failure("Chromium closed its DevTools pipe (did it crash?)") from None
        deadline = time.monotonic() + PROTOCOL_SECONDS
        while True:  # events arrive interleaved with replies; none of them is needed here
            reply = self._receive(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise Failure(f"{method}: {reply['error'].get('message', reply['error'])}")
                return dict(reply.get("result", {}))

    def evaluate(self, session: str, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise Failure(f"script failed in the page: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failure("Chromium did not answer in time")
            readable, _, _ = select.select([self.receive_fd], [], [], remaining)
            if readable:
                chunk = os.read(self.receive_fd, 1 << 20)
                if not chunk:
                    raise Failure("Chromium closed its DevTools pipe (did it crash?)")
                self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return dict(json.loads(message))


@contextmanager
def chromium(width: int, height: int, workdir: Path) -> Iterator[DevTools]:
    """Headless Chromium with a fresh profile; yields its DevTools pipe, stops it on exit."""
    if not os.access(CHROMIUM, os.X_OK):
        raise Failure(f"{CHROMIUM} not found: apt-get install -y chromium")
    profile = workdir / "chromium-profile"
    profile.mkdir()
    to_browser_read, to_browser_write = os.pipe()
    from_browser_read, from_browser_write = os.pipe()
    # Chromium reads commands on fd 3 and writes replies on fd 4. A shell puts the pipe ends
    # there (Popen can keep file descriptors open but cannot renumber them) and then becomes
    # the browser, so the group leader stop_group signals is Chromium's launcher itself.
    command = [
        "/bin/sh",
        "-c",
        'exec "$@" 3<&"$READ_FD" 4>&"$WRITE_FD"',
        "sh",
        CHROMIUM,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    env = {**os.environ, "READ_FD": str(to_browser_read), "WRITE_FD": str(from_browser_write)}
    log = workdir / "chromium.log"
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(to_browser_read, from_browser_write),
                start_new_session=True,
            )
    finally:  # the browser holds its own copies; ours would keep the pipe open after it dies
        os.close(to_browser_read)
        os.close(from_browser_write)
    try:
        yield DevTools(to_browser_write, from_browser_read)
    except Failure as failure:
        if proc.poll() is not None:
            raise Failure(
                f"{failure}\nChromium exited with {proc.returncode}:\n{tail(log)}"
            ) from None
        raise
    finally:
        os.close(to_browser_write)  # Chromium shuts down when its command pipe closes
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        stop_group(proc)
        os.close(from_browser_read)


def page_url(
    base: str, target: Target, page: str, artifact: str | None, workflow_type: str | None
) -> str:
    route = f"#/experiments/{quote(target.experiment_id)}"
    if page != "experiment":
        route += f"/runs/{quote(target.run_id)}"
    if page == "artifacts":
        route += "/artifacts"
        if artifact is not None:
            route += "/" + quote(artifact.strip("/"))
    if workflow_type is not None:
        route += f"?workflowType={workflow_type}"  # the UI reads it from the hash route's query
    return f"{base}/{route}"


def needles(target: Target, page: str, artifact: str | None) -> list[str]:
    """Texts whose presence means the page has its data, not just its frame."""
    if page == "experiment":
        return [target.experiment_name]
    if page == "artifacts":
        # The viewer heads the opened file with its path; the tree alone shows only names.
        return [target.run_name] + ([artifact.strip("/")] if artifact else [])
    return [target.run_name, description_start(target.description)]


def shoot(
    browser: DevTools, url: str, wanted: list[str], width: int, height: int, expand: bool
) -> tuple[bytes, str | None]:
    """Open url, wait until it has rendered; returns the PNG and, if it never did, why not."""
    created = browser.call("Target.createTarget", url="about:blank")
    session = browser.call("Target.attachToTarget", targetId=created["targetId"], flatten=True)[
        "sessionId"
    ]
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        session,
        width=width,
        height=height,
        deviceScaleFactor=1,
        mobile=False,
    )
    navigation = browser.call("Page.navigate", session, url=url)
    if navigation.get("errorText"):
        raise Failure(f"could not open {url}: {navigation['errorText']}")

    wanted = [needle for needle in wanted if squash(needle)]
    script = PAGE_STATE_JS.replace("NEEDLES", json.dumps([squash(needle) for needle in wanted]))
    problem: str | None = None
    expanded = not expand
    deadline = time.monotonic() + RENDER_SECONDS
    while True:
        state = browser.evaluate(session, script)
        ready = (
            state["href"].startswith(url.split("#")[0])
            and not state["missing"]
            and state["loading"] == 0
            and state["images"] == 0
            and state["fonts"] == "loaded"
        )
        if ready and state["quietMs"] >= QUIET_MS:
            if expanded:
                break
            expanded = True  # clicked on a settled page, then waited for it to settle again
            if browser.evaluate(session, EXPAND_DESCRIPTION_JS) == 0:
                print(
                    "note: no 'Show more' to click: the description is shown whole", file=sys.stderr
                )
        elif time.monotonic() > deadline:
            missing = [wanted[i] for i in state["missing"]]
            problem = (
                f"page not settled after {RENDER_SECONDS:.0f}s: missing text {missing}, "
                f"{state['loading']} loading indicator(s), {state['images']} image(s) loading, "
                f"fonts {state['fonts']}, DOM quiet for {state['quietMs']:.0f} ms"
            )
            break
        time.sleep(POLL_SECONDS)

    shot = browser.call("Page.captureScreenshot", session, format="png")
    return base64.b64decode(shot["data"]), problem


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM would otherwise end us without unwinding, leaving the server and browser behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        store_uri = normalise_store_uri(args.backend_store_uri)
        target = find_target(store_uri, args.experiment, args.run_id)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    destination = args.artifacts_destination
    if destination is not None and "://" not in destination:
        destination = str(Path(destination).resolve())  # the server runs in a scratch directory
    output: Path = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ui_shot_")))
            base = stack.enter_context(mlflow_server(store_uri, destination, workdir))
            browser = stack.enter_context(chromium(args.width, args.height, workdir))
            url = page_url(base, target, args.page, args.artifact, args.workflow_type)
            png, problem = shoot(
                browser,
                url,
                needles(target, args.page, args.artifact),
                args.width,
                args.height,
                args.expand_description,
            )
        output.write_bytes(png)
    except Failure as failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    print(f"{output}: {target.experiment_name} / {target.run_name} ({url.split('#', 1)[1]})")
    if problem is not None:
        print(f"error: {problem} (screenshot written as it stood)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: the context managers have stopped server and browser
        sys.exit(130)
