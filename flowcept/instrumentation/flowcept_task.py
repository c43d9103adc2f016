"""``@flowcept_task``: capture every call of a function (sync or ``async def``) as a task."""

from __future__ import annotations

import functools
import inspect
import keyword
import sys
from time import time
from typing import Any, Callable, Dict, Optional, Sequence, Union

from flowcept import capture
from flowcept.buffer import splice_line
from flowcept.capture import current_task_id, get_parent, reset_parent, set_parent
from flowcept.ids import id_factory
from flowcept.instrumentation.task_capture import FlowceptTask, _error_text, _telemetry_line, full_record

_ids = id_factory()

__all__ = ["flowcept_task", "FlowceptTask", "default_args_handler"]


def default_args_handler(*args: Any, **kwargs: Any) -> Dict[str, Any]:
    """Name positional values ``arg_<i>`` (an argparse Namespace is expanded) and keep keywords."""
    handled: Dict[str, Any] = {}
    argparse = sys.modules.get("argparse")  # a Namespace exists only if argparse was imported
    if args and argparse is not None and isinstance(args[0], argparse.Namespace):
        handled.update(vars(args[0]))
        args = args[1:]
    for index, value in enumerate(args):
        handled[f"arg_{index}"] = value
    handled.update(kwargs)
    return handled


def _make_binder(func: Callable) -> Callable[[tuple, dict], Dict[str, Any]]:
    """Return a fast function mapping a call's (args, kwargs) to {parameter: value}.

    Simple signatures (positional-or-keyword and keyword-only parameters) take a zip-based
    path that costs a fraction of ``Signature.bind``; others use ``bind``. Defaults apply.
    """
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    simple = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
    names = tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD)
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    if simple:
        if defaults:
            def bind(args: tuple, kwargs: dict) -> Dict[str, Any]:
                used = dict(defaults)
                used.update(zip(names, args))
                if kwargs:
                    used.update(kwargs)
                if len(args) > len(names):
                    raise TypeError(f"{func.__qualname__}() takes {len(names)} positional arguments "
                                    f"but {len(args)} were given")
                return used
        else:
            def bind(args: tuple, kwargs: dict) -> Dict[str, Any]:
                used = dict(zip(names, args))
                if kwargs:
                    used.update(kwargs)
                if len(args) > len(names):
                    raise TypeError(f"{func.__qualname__}() takes {len(names)} positional arguments "
                                    f"but {len(args)} were given")
                return used
        return bind

    def bind_general(args: tuple, kwargs: dict) -> Dict[str, Any]:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return default_args_handler(*args, **kwargs)
        bound.apply_defaults()
        used = dict(bound.arguments)
        for p in params:  # flatten **kwargs into the top level, as users expect
            if p.kind == p.VAR_KEYWORD and isinstance(used.get(p.name), dict):
                used.update(used.pop(p.name))
        return used

    return bind_general


def _generated(result: Any, output_names: Union[None, str, Sequence[str]]) -> Optional[Dict[str, Any]]:
    if result is None:
        return None
    if isinstance(result, dict):
        return result
    if output_names:
        if isinstance(output_names, str):
            return {output_names: result}
        if isinstance(result, (tuple, list)) and len(output_names) == len(result):
            return dict(zip(output_names, result))
        if len(output_names) == 1:
            return {output_names[0]: result}
    return {"arg_0": result}


# The body of a wrapper compiled for one signature (see _compiled_wrapper). Python binds the
# arguments itself (C speed, its own error messages) and ``used`` is one dict display: no
# *args/**kwargs packing, no binder call. Every name it uses starts with _fc_, which no
# parameter of a compiled function may: builtins too (a parameter may be called ``type``).
_WRAPPER_TEMPLATE = """
def _fc_make(_fc_fn, _fc_slow, _fc_capture, _fc_time, _fc_cv, _fc_ids, _fc_splice_line, _fc_full_record,
             _fc_finish, _fc_generated, _fc_activity, _fc_output_names, _fc_defaults, _fc_builtins):
    _fc_str, _fc_next, _fc_type, _fc_dict, _fc_len, _fc_BaseException, _fc_ValueError = _fc_builtins
    {unpack_defaults}
    def {name}({params}):
        _fc_run = _fc_capture.state
        _fc_lines = _fc_run.lines
        if _fc_lines is None or _fc_run.telemetry is not None:
            return _fc_slow({call})
        _fc_id = _fc_ids.prefix + _fc_str(_fc_next(_fc_ids.counter))
        _fc_record = {{"type": "task", "task_id": _fc_id, "workflow_id": _fc_run.workflow_id,
                      "activity_id": _fc_activity, "started_at": _fc_time(), "used": {{{used}}}}}
        _fc_parent = _fc_cv.get()
        if _fc_parent is not None:
            _fc_record["parent_task_id"] = _fc_parent
        _fc_token = _fc_cv.set(_fc_id)
        try:
            _fc_result = _fc_fn({call})
        except _fc_BaseException as _fc_error:
            _fc_finish(_fc_record, _fc_token, None, _fc_run.splice, _fc_run, None, _fc_error)
            raise
        try:
            _fc_cv.reset(_fc_token)
        except _fc_ValueError:
            pass
        _fc_record["ended_at"] = _fc_time()
        _fc_record["status"] = "FINISHED"
        if _fc_result is not None:
            _fc_record["generated"] = (_fc_result if _fc_type(_fc_result) is _fc_dict
                                       else _fc_generated(_fc_result, _fc_output_names))
        if _fc_capture.state is _fc_run:
            _fc_lines.append(_fc_splice_line(_fc_record, _fc_run.suffix, _fc_run.rest))
            if not _fc_len(_fc_lines) % _fc_run.flush_size:
                _fc_run.pipeline.full(_fc_lines)
        else:
            _fc_capture.state.append(_fc_full_record(_fc_record, _fc_run))
        return _fc_result
    return {name}
"""


def _compiled_wrapper(function: Callable, slow: Callable, activity_id: str, output_names: Any,
                      finish: Callable) -> Optional[Callable]:
    """A wrapper compiled for ``function``'s own signature, or None where it does not apply.

    Applies to plain signatures (positional-or-keyword and keyword-only parameters, with or
    without defaults) without a ``workflow_id``/``campaign_id`` parameter (those set the task's
    own, see ``begin``). Anything the fast path cannot take (no pipeline, telemetry, a run
    changed meanwhile) goes to ``slow``, the general wrapper, with the same arguments. The
    record is the one the general wrapper writes, ``used`` in signature order.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if any(p.kind not in kinds or p.name.startswith("_fc_") or not p.name.isidentifier()
           or p.name in ("workflow_id", "campaign_id") for p in params):
        return None
    name = function.__name__
    if not name.isidentifier() or name.startswith("_fc_") or keyword.iskeyword(name):
        name = "wrapper"
    defaults = [p.default for p in params if p.default is not p.empty]
    declared, passed = [], []
    index = 0
    keyword_only = False
    for p in params:
        if p.kind == p.KEYWORD_ONLY and not keyword_only:
            declared.append("*")
            keyword_only = True
        if p.default is not p.empty:
            declared.append(f"{p.name}=_fc_d{index}")
            index += 1
        else:
            declared.append(p.name)
        passed.append(f"{p.name}={p.name}" if p.kind == p.KEYWORD_ONLY else p.name)
    source = _WRAPPER_TEMPLATE.format(
        name=name, params=", ".join(declared), call=", ".join(passed),
        used=", ".join(f"{p.name!r}: {p.name}" for p in params),
        unpack_defaults="".join(f"_fc_d{i} = _fc_defaults[{i}]; " for i in range(len(defaults))) or "pass")
    namespace: Dict[str, Any] = {}
    try:
        exec(compile(source, f"<flowcept_task {function.__qualname__}>", "exec"), namespace)
    except SyntaxError:  # pragma: no cover - names were checked above
        return None
    return namespace["_fc_make"](function, slow, capture, time, current_task_id, _ids, splice_line, full_record,
                                 finish, _generated, activity_id, output_names, defaults,
                                 (str, next, type, dict, len, BaseException, ValueError))


def flowcept_task(func: Optional[Callable] = None, **decorator_kwargs: Any) -> Callable:
    """Decorate a function so each call is captured as a task.

    Works bare (``@flowcept_task``) or with options (``@flowcept_task(output_names=["y"])``).
    Options: ``activity_id`` (default: the function name), ``output_names``, ``subtype``,
    ``tags``, ``custom_metadata``, ``args_handler`` (callable(*args, **kwargs) -> dict),
    ``capture_telemetry``, ``agent_id``, ``source_agent_id``. Arguments are bound by parameter
    name (positional ones too, defaults applied) into ``used``; the return value goes to
    ``generated`` (a dict as is, else under ``output_names`` or ``arg_0``). An exception is
    recorded (status ERROR, error text in ``stderr``) and re-raised. Nested calls get
    ``parent_task_id``. An argument named ``workflow_id`` or ``campaign_id`` sets the task's.
    """

    def decorate(function: Callable) -> Callable:
        activity_id = decorator_kwargs.get("activity_id") or function.__name__
        output_names = decorator_kwargs.get("output_names")
        args_handler = decorator_kwargs.get("args_handler")
        capture_telemetry = decorator_kwargs.get("capture_telemetry")
        extra = {k: decorator_kwargs[k] for k in ("subtype", "tags", "custom_metadata", "agent_id",
                                                   "source_agent_id") if decorator_kwargs.get(k) is not None}
        bind = _make_binder(function)

        def begin(args: tuple, kwargs: dict, run: Any) -> tuple:
            if args_handler is not None:
                used = args_handler(*args, **kwargs)
            else:
                used = bind(args, kwargs)
            task_id = _ids.prefix + str(next(_ids.counter))
            # type, task_id, workflow_id lead every task line (consolidation relies on it).
            record = {"type": "task", "task_id": task_id, "workflow_id": run.workflow_id,
                      "activity_id": activity_id, "started_at": time(), "used": used}
            parent = get_parent()
            if parent is not None:
                record["parent_task_id"] = parent
            splice = run.splice
            if "workflow_id" in used or "campaign_id" in used:
                workflow_id = used.pop("workflow_id", None)
                if workflow_id:
                    record["workflow_id"] = workflow_id
                campaign_id = used.pop("campaign_id", None)
                if campaign_id:
                    record["campaign_id"] = campaign_id
                    splice = None  # overrides a constant field of the run
            if extra:
                record.update(extra)
            telemetry = run.telemetry if capture_telemetry is None or capture_telemetry else None
            if capture_telemetry and telemetry is None:
                from flowcept.telemetry import ensure_capture

                telemetry = ensure_capture()
            if telemetry is not None:
                record["telemetry_at_start"] = telemetry.capture()
            return record, set_parent(task_id), telemetry, splice

        def finish(record: dict, token: Any, telemetry: Any, splice: Any, run: Any, result: Any,
                   error: Optional[BaseException]) -> None:
            try:
                reset_parent(token)
            except ValueError:
                pass
            record["ended_at"] = time()
            if error is None:
                record["status"] = "FINISHED"
                generated = _generated(result, output_names)
                if generated is not None:
                    record["generated"] = generated
            else:
                record["status"] = "ERROR"
                record["stderr"] = _error_text(type(error), error)
            if telemetry is not None:
                record["telemetry_at_end"] = telemetry.capture()
            if splice is not None and capture.state is run:
                if telemetry is not None and run.pipeline is not None:  # cached snapshots: their JSON as made
                    run.pipeline.append_line(record["workflow_id"], _telemetry_line(record, telemetry, run))
                else:
                    splice(record, run.suffix, run.rest, record["workflow_id"])
            else:  # the run changed during the call, the call overrides a constant field, no pipeline
                capture.state.append(full_record(record, run))

        if inspect.iscoroutinefunction(function):
            @functools.wraps(function)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                run = capture.state
                if not run.capturing:
                    return await function(*args, **kwargs)
                record, token, telemetry, splice = begin(args, kwargs, run)
                try:
                    result = await function(*args, **kwargs)
                except BaseException as error:
                    finish(record, token, telemetry, splice, run, None, error)
                    raise
                finish(record, token, telemetry, splice, run, result, None)
                return result

            return async_wrapper

        if args_handler is None and capture_telemetry is None and not extra:
            # The common case, inlined: one Python frame per call besides the function's own.
            @functools.wraps(function)
            def fast_wrapper(*args: Any, **kwargs: Any) -> Any:
                run = capture.state
                lines = run.lines
                if lines is None or run.telemetry is not None:
                    return wrapper(*args, **kwargs)
                used = bind(args, kwargs)
                if "workflow_id" in used or "campaign_id" in used:
                    return wrapper(*args, **kwargs)
                task_id = _ids.prefix + str(next(_ids.counter))
                record = {"type": "task", "task_id": task_id, "workflow_id": run.workflow_id,
                          "activity_id": activity_id, "started_at": time(), "used": used}
                parent = get_parent()
                if parent is not None:
                    record["parent_task_id"] = parent
                token = set_parent(task_id)
                try:
                    result = function(*args, **kwargs)
                except BaseException as error:
                    finish(record, token, None, run.splice, run, None, error)
                    raise
                try:
                    reset_parent(token)
                except ValueError:
                    pass
                record["ended_at"] = time()
                record["status"] = "FINISHED"
                if result is not None:
                    record["generated"] = result if type(result) is dict else _generated(result, output_names)
                if capture.state is run:
                    lines.append(splice_line(record, run.suffix, run.rest))
                    if not len(lines) % run.flush_size:
                        run.pipeline.full(lines)
                else:
                    capture.state.append(full_record(record, run))
                return result

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            run = capture.state
            if not run.capturing:
                return function(*args, **kwargs)
            record, token, telemetry, splice = begin(args, kwargs, run)
            try:
                result = function(*args, **kwargs)
            except BaseException as error:
                finish(record, token, telemetry, splice, run, None, error)
                raise
            finish(record, token, telemetry, splice, run, result, None)
            return result

        if args_handler is None and capture_telemetry is None and not extra:
            generated = _compiled_wrapper(function, wrapper, activity_id, output_names, finish)
            if generated is not None:
                return functools.wraps(function)(generated)
            return fast_wrapper
        return wrapper

    if func is not None and callable(func):
        return decorate(func)
    return decorate
