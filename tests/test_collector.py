"""The garbage collector around start-up (ownllm/collector.py): paused while importing, on again after, and what
was loaded frozen out of later collections; each case in a fresh interpreter (freezing is for a whole process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _in_fresh_python(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_imports_run_without_collections_and_end_frozen_with_the_collector_on() -> None:
    report = _in_fresh_python("""
import gc, json, sys
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
from ownllm.collector import import_at_start
before = len(collections)
import_at_start("email.mime.multipart", "xml.dom.minidom")
during = len(collections) - before
print(json.dumps({"imported": all(m in sys.modules for m in ("email.mime.multipart", "xml.dom.minidom")),
                  "collections": during, "frozen": gc.get_freeze_count(), "enabled": gc.isenabled()}))
""")
    assert report["imported"] and report["collections"] == 0 and report["enabled"], report
    assert report["frozen"] > 1000, report


@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_pause_leaves_the_collector_as_it_found_it(enabled_before: bool) -> None:
    report = _in_fresh_python(f"""
import gc, json
from ownllm.collector import collector_paused
{'' if enabled_before else 'gc.disable()'}
try:
    with collector_paused():
        inside = gc.isenabled()
        raise KeyError("an import failed")
except KeyError:
    pass
print(json.dumps({{"inside": inside, "after": gc.isenabled()}}))
""")
    assert report == {"inside": False, "after": enabled_before}


def test_freezing_the_heap_frees_unreachable_cycles_first() -> None:
    report = _in_fresh_python("""
import gc, json, weakref
from ownllm.collector import freeze_heap
class Node: pass
kept, lost = Node(), Node()
lost.itself = lost  # a cycle nothing else reaches
alive = weakref.ref(lost)
del lost
freeze_heap()
print(json.dumps({"cycle_freed": alive() is None, "kept_frozen": gc.get_freeze_count() > 0,
                  "kept_tracked": gc.is_tracked(kept)}))
""")
    assert report == {"cycle_freed": True, "kept_frozen": True, "kept_tracked": True}


def test_a_verbs_start_up_pause_ends_at_the_models_load_and_only_there() -> None:
    report = _in_fresh_python("""
import gc, json
from ownllm.collector import freeze_heap, pause_for_start_up, start_up_done
start_up_done()  # never paused (a library user's process): nothing changes
untouched = (gc.isenabled(), gc.get_freeze_count())
pause_for_start_up()
paused = gc.isenabled()
import xml.dom.minidom
start_up_done()
resumed = (gc.isenabled(), gc.get_freeze_count() > untouched[1])
frozen = gc.get_freeze_count()
start_up_done()  # a second load: no new freeze
second_load_froze_nothing = gc.get_freeze_count() == frozen
pause_for_start_up(); freeze_heap()  # a server that loaded no model through load_model still gets it back on
print(json.dumps({"untouched": untouched, "paused": paused, "resumed": resumed,
                  "second_load_froze_nothing": second_load_froze_nothing, "after_freeze_heap": gc.isenabled()}))
""")
    assert report == {"untouched": [True, 0], "paused": False, "resumed": [True, True],
                      "second_load_froze_nothing": True, "after_freeze_heap": True}, report


def test_a_verb_that_ends_before_any_load_leaves_the_collector_on_and_nothing_frozen() -> None:
    """The CLI in process (as a program embedding it calls it): a model that does not exist ends the verb before any
    load, and the start-up pause ends with it."""
    report = _in_fresh_python("""
import gc, json
from ownllm.cli import main
code = main(["generate", "no-such-model-anywhere", "hi"])
print(json.dumps({"code": code, "enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}))
""")
    assert report == {"code": 2, "enabled": True, "frozen": 0}, report
