"""Candidate sources: imports parsed with tree-sitter and resolved to project files, path distance, definitions,
lexical similarity."""

from __future__ import annotations

import pytest

from mellum.context import ContextConfig, ProjectIndex
from mellum.context import sources as src

CONFIG = ContextConfig(max_file_bytes=20_000)


@pytest.fixture
def index(shop):
    return ProjectIndex(shop.root, CONFIG)


def _query(index, path, prefix=None, suffix="", open_paths=()):
    text = index.files[path].text if prefix is None else prefix
    return src.Query.build(path, index.files[path].language, text, suffix, list(open_paths), CONFIG)


@pytest.mark.parametrize(
    "language, code, targets",
    [
        ("python", "import os.path\nfrom . import util as u\nfrom ..core.models import A, B\nif X:\n    import json\n"
                   "def f():\n    from pkg import mod\n", ["os.path", ".util", ".", "..core.models.A", "..core.models.B",
                                                            "..core.models", "json", "pkg.mod", "pkg"]),
        ("javascript", "import x from './a';\nconst y = require('../b');\nexport * from './c';\nexport const z = 1;\n",
         ["./a", "../b", "./c"]),
        ("typescript", "import { T } from './types';\nimport type { U } from \"@lib/u\";\n", ["./types", "@lib/u"]),
        ("java", "package a;\nimport com.x.Y;\nimport static com.x.Z.f;\nimport com.w.*;\nclass A {}\n", ["com.x.Y", "com.x.Z.f", "com.w.*"]),
        ("kotlin", "package a\nimport com.x.Y\nimport com.w.*\nimport com.v.Q as R\nfun f() {}\n", ["com.x.Y", "com.w.*", "com.v.Q"]),
        ("go", 'package main\nimport (\n\t"fmt"\n\tu "example.com/m/util"\n)\nimport "os"\n', ["fmt", "example.com/m/util", "os"]),
    ],
)
def test_parse_imports_with_tree_sitter(language, code, targets):
    assert src.parse_imports(code, language) == targets


def test_imports_in_strings_and_comments_are_not_imports():
    code = 'text = "import os"\n# from secrets import token\n'
    assert src.parse_imports(code, "python") == []


@pytest.mark.parametrize(
    "path, expected",
    [
        ("app/checkout.py", ["app/models.py", "app/pricing.py", "app/__init__.py", "storage/db.py"]),
        ("web/api.ts", ["web/format.ts", "web/helpers.js"]),
        ("java/com/shop/Cart.java", ["java/com/shop/model/Item.java"]),
        ("kotlin/com/shop/Report.kt", ["kotlin/com/shop/model/Summary.kt"]),
        ("go/cmd/main.go", ["go/internal/tax/tax.go"]),
    ],
)
def test_imports_resolve_to_project_files(index, path, expected):
    assert src.imported_files(index, _query(index, path), n=10) == expected


def test_path_distance_orders_by_folder_steps_then_language(index):
    near = src.path_distance(index, _query(index, "app/checkout.py"), n=8)
    assert near[:4] == ["app/__init__.py", "app/legacy_pricing.py", "app/models.py", "app/pricing.py"]  # same folder
    assert near[4] == "storage/db.py"  # one folder over, Python before the TypeScript next door
    assert "app/checkout.py" not in near


def test_open_and_recent_files_exclude_the_current_one(index):
    q = _query(index, "app/checkout.py", open_paths=["app/checkout.py", "storage/db.py", "gone.py"])
    assert src.open_files(index, q) == ["storage/db.py"]
    index.update("web/format.ts", index.files["web/format.ts"].text + "\n// edited\n")
    index.update("app/checkout.py", index.files["app/checkout.py"].text + "\n# edited\n")
    assert src.recent_files(index, q, 5) == ["web/format.ts"]


def test_definitions_of_identifiers_near_the_cursor(shop, index):
    path, prefix, suffix = shop.cursor()
    q = src.Query.build(path, "python", prefix, suffix, [], CONFIG)
    assert q.near_idents[:3] == ["discount_rate", "customer", "total"]  # nearest to the cursor first
    chunks = [index.chunks[c] for c in src.definition_chunks(index, q, CONFIG)]
    places = {(c.path, c.start_line) for c in chunks}
    pricing_def = next(line for name, line in index.files["app/pricing.py"].defs if name == "apply_discount")
    assert any(p == "app/pricing.py" and c.start_line <= pricing_def < c.end_line for c in chunks for p in [c.path])
    assert ("storage/db.py", index.chunk_at("storage/db.py", 13).start_line) in places  # save_order, in the suffix
    assert all(c.path != path for c in chunks)


def test_lexical_sources_rank_the_defining_chunk_high(shop, index):
    path, prefix, suffix = shop.cursor()
    q = src.Query.build(path, "python", prefix, suffix, [], CONFIG)
    bm25 = src.bm25_chunks(index, q, top_k=5)
    assert {index.chunks[c].path for c, _ in bm25[:3]} & {"app/pricing.py", "app/legacy_pricing.py", "app/models.py"}
    assert all(index.chunks[c].path != path for c, _ in bm25)
    assert [s for _, s in bm25] == sorted((s for _, s in bm25), reverse=True)
    jac = src.jaccard_chunks(index, q, ["app/models.py", "web/format.ts"], top_k=5)
    assert jac and all(index.chunks[c].path == "app/models.py" for c, _ in jac)  # format.ts shares no identifier
    assert all(0 < s <= 1 for _, s in jac)


def _write(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_typescript_esm_imports_name_the_emitted_js_file(tmp_path):
    # Under "module": "node16"/"bundler", TypeScript source imports `./lib/helper.js` for `lib/helper.ts`.
    _write(tmp_path, {
        "src/lib/helper.ts": "export function helper(a: number): number { return a + 1; }\n",
        "src/view.tsx": "export const View = () => null;\n",
        "src/esm.mts": "export const esm = 1;\n",
        "src/main.ts": 'import { helper } from "./lib/helper.js";\nimport { View } from "./view.jsx";\n'
                       'import { esm } from "./esm.mjs";\nexport const y = helper(1);\n',
    })
    index = ProjectIndex(tmp_path, CONFIG)
    assert src.imported_files(index, _query(index, "src/main.ts"), n=10) == ["src/lib/helper.ts", "src/view.tsx", "src/esm.mts"]


def test_java_wildcard_imports_resolve_to_files(tmp_path):
    java = "src/main/java/com/x"
    _write(tmp_path, {
        f"{java}/model/User.java": "package com.x.model;\npublic class User {}\n",
        f"{java}/model/model.java": "package com.x.model;\nclass model {}\n",  # a file named after its folder
        f"{java}/util/Consts.java": "package com.x.util;\npublic class Consts { public static int MAX = 3; }\n",
        f"{java}/notmodel/Other.java": "package com.x.notmodel;\nclass Other {}\n",
        f"{java}/App.java": "package com.x;\nimport com.x.model.*;\nimport static com.x.util.Consts.*;\nclass App {}\n",
    })
    index = ProjectIndex(tmp_path, CONFIG)
    found = src.imported_files(index, _query(index, f"{java}/App.java"), n=10)
    # Files only (the old lookup returned the folder's path when a file was named after it), and the class of a
    # static wildcard import.
    assert found == [f"{java}/model/User.java", f"{java}/model/model.java", f"{java}/util/Consts.java"]
