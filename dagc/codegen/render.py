"""Render the per-actor loop modules from Jinja2 templates in ``templates/``.

The render model is built here; templates only loop and branch over it. Every identifier
in generated code comes from one namespace (:func:`local`), and no live object is ever
``repr()``-ed into source: constants, methods and channel ends are fetched from the runtime
by name when the module is bound on its actor.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from dagc.ir import DRIVER, INPUT, IR, Arg, Const, Field, Ref
from dagc.schedule import Action, Kind, Schedule
from dagc.version import __version__


@dataclass(frozen=True)
class GeneratedModule:
    actor: str  # "a1" or "driver"
    label: str  # "a1:Stage"
    filename: str  # the name tracebacks show: "<dagc a1:Stage 3f2a9c1d0e4b>"
    source: str
    line_steps: tuple  # (generated line number, schedule step) pairs, for error reports

    def step_at(self, lineno: int) -> int | None:
        best = None
        for ln, step in self.line_steps:
            if ln <= lineno:
                best = step
        return best


def template_dir() -> Path:
    here = Path(__file__).resolve().parent.parent.parent / "templates"
    if (here / "actor_loop.py.j2").exists():
        return here
    from importlib import resources

    return Path(str(resources.files("dagc._templates")))


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


_IDENT = re.compile(r"[^0-9a-zA-Z_]")


def local(arg: Arg, nfields: int) -> str:
    """The generated-code name of an argument: t3 -> t3, t3.1 -> t3_1, in -> inp,
    $0 -> inp / inp[0], #2 -> k2."""
    if type(arg) is Ref:
        if arg.index is not None:
            return f"{arg.op}_{arg.index}"
        return "inp" if arg == INPUT else arg.op
    if isinstance(arg, Field):
        return "inp" if nfields == 1 else f"inp[{arg.number}]"
    if isinstance(arg, Const):
        return f"k{arg.number}"
    raise TypeError(f"not an IR argument: {arg!r}")


def _ident(s: str) -> str:
    return _IDENT.sub("_", s)


def recv_handle(value: Ref) -> str:
    """The local holding an issued receive of ``value`` (icrecv and its wait_recv)."""
    return f"h_{local(value, 0)}"


def send_handle(value: Ref, peer: str) -> str:
    """The local holding an issued send of ``value`` to ``peer`` (isend and its wait_send)."""
    return f"h_{local(value, 0)}_{peer}"


class _Model:
    """Collects the bindings (methods, constants, channel ends) an actor's loop needs."""

    def __init__(self, nfields: int):
        self.nfields = nfields
        self.bindings: dict[str, str] = {}  # local name -> runtime expression

    def bind(self, name: str, expr: str) -> str:
        self.bindings.setdefault(name, expr)
        return name

    def ref(self, r: Arg) -> str:
        if isinstance(r, Const):
            return self.bind(f"k{r.number}", f"rt.constant({r.number})")
        return local(r, self.nfields)


def _action_model(sched: Schedule, actor: str, step: int, a: Action, m: _Model, where: str) -> dict:
    """The template's view of one action. ``where``: the user's method's place, or ""."""
    k = a.kind
    d = {"kind": k, "step": step}
    if k in (Kind.CALL, Kind.COLL):
        call = sched.call(a.value)
        grp = f" [{a.group}]" if a.group else ""
        d["comment"] = f"step {step}  {call}{grp}" + (f"   {where}" if where else "")
        if k == Kind.CALL:
            fn = m.bind(f"m_{_ident(a.method)}", f"rt.method({a.method!r})")
            # held around the call only (the actor's method lock; loop.py, method_lock)
            m.bind("lock_acquire", "rt.lock.acquire")
            m.bind("lock_release", "rt.lock.release")
        else:
            fn = m.bind(f"coll_{a.group}", f"rt.collective({a.group!r})")
        args = [m.ref(x) for x in call.args]
        kwargs = [f"{kw}={m.ref(v)}" for kw, v in call.kwargs]
        checks = sorted({local(x, m.nfields) for x in call.refs() if isinstance(x, Ref)})
        n = call.num_returns
        d.update(
            fn=fn,
            call_args=", ".join(args + kwargs),
            checks=checks,
            target=local(a.value, m.nfields),
            method=a.method,
            actor=actor,
            where=repr(where) if where else "",  # a Python literal, or nothing
            outs=[f"{a.value}_{i}" for i in range(n)] if n != 1 else [],
            num_returns=n,
        )
        return d
    cid = sched.channel_of(actor, a).id
    d["comment"] = f"step {step}  {a} via {cid}"
    if k == Kind.WAIT_RECV:
        d.update(target=local(a.value, m.nfields), handle=recv_handle(a.value))
    elif k == Kind.WAIT_SEND:
        d.update(handles=[send_handle(a.value, p) for p in a.peers])
    elif k == Kind.RECV:
        d.update(
            fn=m.bind(f"read_{cid}", f"rt.reader({cid!r}).read"), target=local(a.value, m.nfields)
        )
    elif k == Kind.SEND:
        d.update(
            fn=m.bind(f"write_{cid}", f"rt.writer({cid!r}).write"), source=local(a.value, m.nfields)
        )
    elif k in (Kind.CSEND, Kind.ISEND):
        cw = m.bind(f"cw_{cid}", f"rt.comm_writer({cid!r})")
        d.update(
            obj=cw,
            source=local(a.value, m.nfields),
            peer=a.peers[0],
            handle=send_handle(a.value, a.peers[0]),
        )
    elif k in (Kind.CRECV, Kind.ICRECV):
        cr = m.bind(f"cr_{cid}", f"rt.comm_reader({cid!r})")
        d.update(obj=cr, target=local(a.value, m.nfields), handle=recv_handle(a.value))
    else:
        raise AssertionError(f"no code for schedule action kind {a.kind!r} ({a})")
    return d


def _header(ir: IR, actor: str, label: str, origin: str) -> dict:
    return {
        "version": __version__,
        "graph": ir.fingerprint(),
        "actor": actor,
        "label": label,
        "passes": ",".join(ir.passes),
        "origin": origin or "<unknown>",
    }


def render_actor(
    ir: IR, sched: Schedule, actor: str, origin: str = "", profile: bool = False
) -> GeneratedModule:
    nfields = len(ir.inputs.fields)
    m = _Model(nfields)
    spec = ir.actor(actor)
    acts = [
        _action_model(sched, actor, step, a, m, spec.where(a.method) if a.kind == Kind.CALL else "")
        for step, a in sched.of(actor)
    ]
    label = sched.labels.get(actor, actor)
    model = {
        "h": _header(ir, actor, label, origin),
        "actions": acts,
        "bindings": sorted(m.bindings.items(), key=_binding_order),
        "locked": "lock_acquire" in m.bindings,
        "profile": profile,
    }
    src = environment().get_template("actor_loop.py.j2").render(**model)
    return _finish(actor, label, ir, src)


def render_driver(ir: IR, sched: Schedule, origin: str = "") -> GeneratedModule:
    nfields = len(ir.inputs.fields)
    m = _Model(nfields)
    inputs = []  # one write per input channel (readers on several nodes: several)
    outputs = []
    for step, a in sched.of(DRIVER):
        cid = sched.channel_of(DRIVER, a).id
        if a.kind == Kind.SEND:
            inputs.append(m.bind(f"write_{cid}", f"rt.writer({cid!r}).write"))
        elif a.kind == Kind.RECV:
            outputs.append(
                {
                    "target": local(a.value, nfields),
                    "channel": cid,
                    "fn": m.bind(f"read_{cid}", f"rt.reader({cid!r}).read"),
                    "comment": f"step {step}  {a} via {cid}",
                }
            )
    if len(outputs) > 1:  # several outputs: read in order when all are there (fail fast)
        for o in outputs:
            o["ready"] = m.bind(f"ready_{o['channel']}", f"rt.reader({o['channel']!r}).ready")
    fields = []
    for f in ir.inputs.fields:
        fields.append(f"args[{f}]" if isinstance(f, int) else f"kwargs[{f!r}]")
    kws = list(ir.inputs.kwargs)
    cond = [f"len(args) != {ir.inputs.num_positional}"]
    cond += [f"{k!r} not in kwargs" for k in kws]
    if not kws:
        cond.append("kwargs")
    result = [local(r, nfields) for r in ir.output.refs]
    model = {
        "h": _header(ir, DRIVER, DRIVER, origin),
        "inputs": inputs,
        "fields": fields,
        "bad_input": " or ".join(cond),
        "outputs": outputs,
        "gather_channels": repr(tuple(o["channel"] for o in outputs)),
        "gather_targets": ", ".join(o["target"] for o in outputs),
        "all_ready": " and ".join(f"{o['ready']}()" for o in outputs if "ready" in o),
        "result": ("[" + ", ".join(result) + "]") if ir.output.multi else result[0],
        "bindings": sorted(m.bindings.items(), key=_binding_order),
    }
    src = environment().get_template("driver.py.j2").render(**model)
    return _finish(DRIVER, DRIVER, ir, src)


def _binding_order(item):
    name = item[0]
    order = {
        "lock": 0,
        "m": 0,
        "k": 1,
        "coll": 2,
        "read": 3,
        "ready": 3,
        "cr": 4,
        "write": 5,
        "cw": 6,
    }
    prefix = name.split("_", 1)[0] if "_" in name else name[:1]
    return (order.get(prefix, 9), name)


_STEP_MARK = re.compile(r"# step (\d+) ")


def _finish(actor: str, label: str, ir: IR, src: str) -> GeneratedModule:
    line_steps = []
    for i, line in enumerate(src.splitlines(), start=1):
        mt = _STEP_MARK.search(line)
        if mt:
            line_steps.append((i, int(mt.group(1))))
    filename = f"<dagc {label} {ir.fingerprint()}>"
    return GeneratedModule(
        actor=actor, label=label, filename=filename, source=src, line_steps=tuple(line_steps)
    )


def render_all(ir: IR, origin: str = "", profile: bool = False) -> dict[str, GeneratedModule]:
    """Every module of a scheduled IR: driver first, then actors in schedule order."""
    sched = ir.schedule
    out = {DRIVER: render_driver(ir, sched, origin)}
    for a in sched.actors:
        if a != DRIVER:
            out[a] = render_actor(ir, sched, a, origin, profile)
    return out
