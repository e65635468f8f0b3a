"""Bleed: unrelated prompts that now answer with an edit's new object.

"Output unchanged" says that an unrelated prompt's greedy answer moved, not where it went. On
a set of edits that share relations (CounterFact's neighbourhood prompts, WikiBigEdit's
same-relation questions) it mostly goes to one of the new objects: "Munjong of Goryeo is
affiliated with the religion of" answered with another edit's "Islam". Teacher-forced
neighbourhood scores (two probabilities compared under the gold prefix) do not show this; the
generated answer does, and it is the damage a user of the edited model meets first.

A locality prompt bleeds when its edited answer equals some edit's target and is neither its
unedited answer nor its given true answer (so a neighbour whose true answer happens to be an
edit's target does not count, nor one that answered so already). All answers are compared
after the same normalisation as exact match. The share that equals its own edit's target is
reported beside it: an edit leaking to its direct neighbours, as opposed to the new objects
becoming the model's answer to a whole relation.
"""
from __future__ import annotations


def bleed(locality, targets: list[str], edited: list[str], unedited: list[str], normalize):
    """Per locality probe (`.edit`: its edit's index, `.answer`: its given answer, "" when
    unknown), with `targets` the edits' targets and `edited` / `unedited` its answers after and
    before the edit: (bleeds to some edit's target, bleeds to its own edit's target), booleans."""
    new = [normalize(t) for t in targets]
    known = set(new) - {""}
    some, own = [], []
    for p, a, b in zip(locality, edited, unedited):
        a = normalize(a)
        bleeds = a in known and a != normalize(b) and a != normalize(p.answer)
        some.append(bleeds)
        own.append(bleeds and a == new[p.edit])
    return some, own
