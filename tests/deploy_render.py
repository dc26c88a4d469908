"""A small, strict kustomize renderer for the deployment tests (not part of the package).

It renders exactly what deploy/k8s uses, so the tests can check the rendered objects on a
machine without kubectl:

- `resources`: YAML files (one or more documents) and folders holding a kustomization.yaml;
- `namespace`;
- `labels`: `pairs` with `includeTemplates` (`includeSelectors: true` is refused);
- `configMapGenerator`: `name` and `files`, with kustomize's content-hash name suffix, and the
  references to the ConfigMap in pod specs renamed to match;
- `images`: `name`, `newName`, `newTag`;
- `patches`: a strategic merge patch (a mapping) or a JSON 6902 patch (a list of add, replace
  and remove operations), from `path` or inline `patch`, with a `target` of `kind` and `name`.

Anything else (a key, a kind, a patch directive it does not know) raises KustomizeError
rather than being skipped, so a kustomization cannot silently drift past what the tests check.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_KEYS = frozenset(
    {
        "apiVersion",
        "kind",
        "namespace",
        "labels",
        "resources",
        "configMapGenerator",
        "images",
        "patches",
    }
)
# The kinds we render, and whether each is namespaced.
KINDS = {
    "Namespace": False,
    "ConfigMap": True,
    "Service": True,
    "Deployment": True,
    "PersistentVolumeClaim": True,
    "PodDisruptionBudget": True,
}
# Strategic merge: list fields merged item by item on a key (as Kubernetes' patchMergeKey);
# every other list is replaced whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
}


class KustomizeError(Exception):
    """The kustomization uses something this renderer does not support, or is wrong."""


@dataclass
class _Generated:
    """A generated ConfigMap: the name written in the kustomization, and the hashed one."""

    name: str
    hashed: str


def render(folder: Path) -> list[Obj]:
    """Render the kustomization in `folder`, as `kubectl kustomize folder` would."""
    objects, _ = _build(folder.resolve(), ())
    return objects


def object_key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _build(folder: Path, stack: tuple[Path, ...]) -> tuple[list[Obj], list[_Generated]]:
    if folder in stack:
        raise KustomizeError(f"{folder}: kustomizations include each other in a cycle")
    path = folder / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{folder}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise KustomizeError(f"{path}: not a mapping")
    unknown = sorted(set(spec) - KUSTOMIZATION_KEYS)
    if unknown:
        raise KustomizeError(f"{path}: unsupported keys {unknown}")
    if spec.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or spec.get("kind") != (
        "Kustomization"
    ):
        raise KustomizeError(f"{path}: expected apiVersion/kind of a v1beta1 Kustomization")

    objects: list[Obj] = []
    generated: list[_Generated] = []
    for entry in spec.get("resources", []):
        target = folder / entry
        if target.is_dir():
            children, child_generated = _build(target.resolve(), (*stack, folder))
            objects += children
            generated += child_generated
        elif target.is_file():
            objects += _load_objects(target)
        else:
            raise KustomizeError(f"{path}: resource {entry!r} is neither a file nor a folder")
    own_generated = [
        _generate_config_map(folder, gen, path) for gen in spec.get("configMapGenerator", [])
    ]
    objects += [obj for obj, _ in own_generated]

    for patch in spec.get("patches", []):
        _apply_patch(folder, patch, objects, path)
    if "namespace" in spec:
        _set_namespace(objects, spec["namespace"], path)
    for labels in spec.get("labels", []):
        _add_labels(objects, labels, path)
    for image in spec.get("images", []):
        _set_image(objects, image, path)

    # The hash suffix and the references to it, once this level's transformations are done.
    for obj, gen in own_generated:
        obj["metadata"]["name"] = gen.hashed = f"{gen.name}-{config_map_hash(obj)}"
        _rename_config_map_refs(objects, gen)
        generated.append(gen)
    _check_unique(objects, path)
    return objects, generated


def _load_objects(path: Path) -> list[Obj]:
    out = []
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise KustomizeError(f"{path}: a document is not a Kubernetes object")
        if doc["kind"] not in KINDS:
            raise KustomizeError(f"{path}: kind {doc['kind']!r} is not supported")
        out.append(doc)
    return out


def _generate_config_map(folder: Path, gen: Any, path: Path) -> tuple[Obj, _Generated]:
    if not isinstance(gen, dict) or set(gen) - {"name", "files"} or "name" not in gen:
        raise KustomizeError(f"{path}: configMapGenerator entries take only name and files")
    data: dict[str, str] = {}
    for item in gen.get("files", []):
        key, sep, rel = str(item).partition("=")
        if not sep:
            key, rel = Path(item).name, item
        data[key] = (folder / rel).read_text(encoding="utf-8")
    obj: Obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": gen["name"]},
        "data": data,
    }
    return obj, _Generated(name=gen["name"], hashed="")


def config_map_hash(obj: Obj) -> str:
    """kustomize's name suffix: sha256 of {"data", "kind", "name"} as Go's encoding/json
    writes it (sorted keys; <, > and & escaped), its first 10 hex digits with 0, 1, 3, a and e
    swapped out so that no word can be spelt.

    The name is hashed as "": kustomize 5 looks it up as one field called "metadata/name",
    finds none, and hashes an empty name (checked against `kubectl kustomize`, kustomize 5.5).
    """
    if "binaryData" in obj:
        raise KustomizeError("binaryData in a ConfigMap is not supported")
    encoded = json.dumps(
        {"data": obj.get("data", {}), "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _rename_config_map_refs(objects: list[Obj], gen: _Generated) -> None:
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if volume.get("configMap", {}).get("name") == gen.name:
                volume["configMap"]["name"] = gen.hashed
            if "projected" in volume:
                raise KustomizeError("projected volumes are not supported")
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            for source in container.get("envFrom", []):
                if source.get("configMapRef", {}).get("name") == gen.name:
                    source["configMapRef"]["name"] = gen.hashed
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref is not None and ref.get("name") == gen.name:
                    ref["name"] = gen.hashed


def _set_namespace(objects: list[Obj], namespace: str, path: Path) -> None:
    for obj in objects:
        if KINDS[obj["kind"]]:
            obj["metadata"]["namespace"] = namespace
        elif obj["kind"] == "Namespace" and obj["metadata"]["name"] != namespace:
            raise KustomizeError(f"{path}: a Namespace named other than {namespace!r}")


def _add_labels(objects: list[Obj], spec: Any, path: Path) -> None:
    if not isinstance(spec, dict) or set(spec) - {"pairs", "includeTemplates", "includeSelectors"}:
        raise KustomizeError(f"{path}: labels entries take pairs and includeTemplates")
    if spec.get("includeSelectors"):
        raise KustomizeError(f"{path}: labels includeSelectors is not supported")
    pairs = {str(k): str(v) for k, v in spec.get("pairs", {}).items()}
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(pairs)
        if spec.get("includeTemplates") and obj["kind"] == "Deployment":
            template = obj["spec"]["template"].setdefault("metadata", {})
            template.setdefault("labels", {}).update(pairs)


def _image_name(image: str) -> str:
    """The image without its tag or digest (a registry's :port is part of the name)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _set_image(objects: list[Obj], spec: Any, path: Path) -> None:
    if (
        not isinstance(spec, dict)
        or set(spec) - {"name", "newName", "newTag"}
        or "name" not in spec
    ):
        raise KustomizeError(f"{path}: images entries take name, newName and newTag")
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            image = container["image"]
            name = _image_name(image)
            if name != spec["name"]:
                continue
            tag = image[len(name) + 1 :] if len(image) > len(name) else ""
            tag = str(spec.get("newTag", tag))
            new_name = spec.get("newName", name)
            container["image"] = f"{new_name}:{tag}" if tag else new_name


def _apply_patch(folder: Path, entry: Any, objects: list[Obj], path: Path) -> None:
    if not isinstance(entry, dict) or set(entry) - {"path", "patch", "target"}:
        raise KustomizeError(f"{path}: patches entries take path, patch and target")
    if ("path" in entry) == ("patch" in entry):
        raise KustomizeError(f"{path}: a patch needs exactly one of path and patch")
    text = (folder / entry["path"]).read_text("utf-8") if "path" in entry else entry["patch"]
    patch = yaml.safe_load(text)
    target = entry.get("target")
    if target is None:
        if not isinstance(patch, dict):
            raise KustomizeError(f"{path}: a JSON 6902 patch needs a target")
        target = {"kind": patch.get("kind"), "name": patch.get("metadata", {}).get("name")}
    if not isinstance(target, dict) or set(target) != {"kind", "name"}:
        raise KustomizeError(f"{path}: a patch target takes exactly kind and name")
    matches = [o for o in objects if object_key(o) == (target["kind"], target["name"])]
    if len(matches) != 1:
        raise KustomizeError(f"{path}: patch target {target} matches {len(matches)} objects")
    (obj,) = matches
    if isinstance(patch, list):
        replacement = apply_json6902(obj, patch)
    elif isinstance(patch, dict):
        replacement = strategic_merge(obj, patch)
    else:
        raise KustomizeError(f"{path}: a patch is a mapping or a list of operations")
    obj.clear()
    obj.update(replacement)


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes' strategic merge patch, for the fields of MERGE_KEYS; other lists replace."""
    if isinstance(patch, dict):
        if any(str(k).startswith("$") for k in patch):
            raise KustomizeError(f"patch directives ({sorted(patch)}) are not supported")
        out = copy.deepcopy(base) if isinstance(base, dict) else {}
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = strategic_merge(out.get(key), value, key)
        return out
    if isinstance(patch, list) and field in MERGE_KEYS and isinstance(base, list):
        key = MERGE_KEYS[field]
        out_list = copy.deepcopy(base)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise KustomizeError(f"a {field} item in a patch needs its {key}")
            index = next((i for i, b in enumerate(out_list) if b.get(key) == item[key]), None)
            if index is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[index] = strategic_merge(out_list[index], item)
        return out_list
    return copy.deepcopy(patch)


def apply_json6902(obj: Obj, operations: list[Any]) -> Obj:
    """RFC 6902's add, replace and remove, on JSON pointers (RFC 6901)."""
    out = copy.deepcopy(obj)
    for op in operations:
        if not isinstance(op, dict) or op.get("op") not in ("add", "replace", "remove"):
            raise KustomizeError(f"JSON patch operation {op!r}: only add, replace and remove")
        if set(op) - {"op", "path", "value"}:
            raise KustomizeError(f"JSON patch operation {op!r}: unknown keys")
        pointer = str(op["path"])
        if not pointer.startswith("/"):
            raise KustomizeError(f"JSON pointer {pointer!r} must start with /")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]
        parent: Any = out
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        value = copy.deepcopy(op.get("value"))
        if isinstance(parent, list):
            if op["op"] == "add":
                parent.insert(len(parent) if last == "-" else int(last), value)
            elif op["op"] == "replace":
                parent[int(last)] = value
            else:
                del parent[int(last)]
        elif op["op"] == "remove" or (op["op"] == "replace" and last not in parent):
            if last not in parent:
                raise KustomizeError(f"JSON pointer {pointer!r}: no such member")
            if op["op"] == "remove":
                del parent[last]
        else:
            parent[last] = value
    return out


def _check_unique(objects: list[Obj], path: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{path}: {key} is defined twice")
        seen.add(key)
