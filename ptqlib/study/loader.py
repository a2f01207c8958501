"""Reading a study file's YAML: the safe loader, stricter where a study file would silently lose or blow up,
and the check of a mapping's keys."""
from __future__ import annotations

import yaml

from ptqlib.errors import ConfigError


class StudyLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter where a study file would silently lose or blow up: a key written twice in
    one mapping is an error (YAML keeps the last: a pipeline written twice lost the first), and anchors and
    aliases are refused (a study file needs neither; nested aliases expand exponentially: a "billion laughs"
    description grew past 2 GB before the loader died)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, f"alias *{event.anchor} is not allowed in a study "
                                                    "file (write the value out)", event.start_mark)
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise yaml.constructor.ConstructorError(None, None, f"anchor &{event.anchor} is not allowed in a study "
                                                    "file (write the value out)", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice in one mapping "
                                                        "(YAML would keep the last silently)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def check_keys(path, where: str, given: dict, valid) -> None:
    """Refuse a key of ``given`` that is not in ``valid``, naming the closest valid one."""
    for k in given:
        if k not in valid:
            import difflib

            near = difflib.get_close_matches(str(k), list(valid), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{path}: {where}: unknown key {k!r}{hint}; valid: {', '.join(sorted(valid))}")
