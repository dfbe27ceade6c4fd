"""Project index: discovery (gitignore, ignore list, secrets, binary/huge/generated, symlinks), incremental updates."""

from __future__ import annotations

import os
import threading

import pytest

from mellum.context import ContextConfig, ProjectIndex
from mellum.context.ignore import IgnoreRules, is_secret, language_of, parse_rules
from mellum.context.index import definitions

from .conftest import FORBIDDEN, OUTSIDE_MARKER

CONFIG = ContextConfig(max_file_bytes=20_000)


def _rules(*lines: str, base: str = "") -> IgnoreRules:
    return IgnoreRules(parse_rules(lines, base))


@pytest.mark.parametrize(
    "patterns, path, is_dir, ignored",
    [
        (["*.log"], "a/b/x.log", False, True),
        (["*.log", "!keep.log"], "keep.log", False, False),
        (["build/"], "src/build", True, True),
        (["build/"], "src/build", False, False),  # dir-only pattern, path is a file
        (["/scratch.py"], "scratch.py", False, True),
        (["/scratch.py"], "sub/scratch.py", False, False),  # anchored to the root
        (["docs/*.md"], "docs/a.md", False, True),
        (["docs/*.md"], "docs/x/a.md", False, False),  # '*' does not cross '/'
        (["**/gen/*.py"], "a/b/gen/x.py", False, True),
        (["a/**/z.py"], "a/z.py", False, True),
        (["a/**/z.py"], "a/b/c/z.py", False, True),
        (["logs/**"], "logs/deep/x.txt", False, True),
        (["file[0-9].py"], "file7.py", False, True),
        (["\\#hash.py"], "#hash.py", False, True),
        (["# comment", ""], "comment", False, False),
    ],
)
def test_gitignore_semantics(patterns, path, is_dir, ignored):
    assert _rules(*patterns).ignored(path, is_dir) is ignored


def test_nested_gitignore_applies_below_its_folder_only():
    rules = _rules("cache_*.py", base="storage")
    assert rules.ignored("storage/cache_a.py", False)
    assert not rules.ignored("app/cache_a.py", False)
    assert rules.ignored_path("storage/cache_a.py")


@pytest.mark.parametrize(
    "path, text, secret",
    [
        (".env", "", True), ("app/.env.local", "", True), ("id_rsa", "", True), ("id_ed25519.pub", "", True),
        ("certs/server.pem", "", True), ("creds/credentials.json", "", True), ("gcp/service-account-prod.json", "", True),
        (".npmrc", "", True), ("secrets.yaml", "", True), ("infra/prod.tfvars", "", True),
        ("app/keys.py", "K = '-----BEGIN RSA PRIVATE KEY-----'", True),
        ("app/aws.py", "KEY = 'AKIAABCDEFGHIJKLMNOP'", True),
        ("secrets.py", "import os\n", False),  # the stdlib module name is code, not a secret
        ("app/env.py", "x = 1", False), ("README.md", "use a .env file", False),
    ],
)
def test_secret_looking_files(path, text, secret):
    assert is_secret(path, text) is secret


def test_language_by_extension():
    assert [language_of(p) for p in ("a.py", "b.tsx", "C.java", "d.kt", "e.go", "f.js", "g.bin")] == [
        "python", "tsx", "java", "kotlin", "go", "javascript", None,
    ]


def test_discovery_keeps_sources_and_skips_everything_else(shop):
    index = ProjectIndex(shop.root, CONFIG)
    assert sorted(index.files) == [
        "app/__init__.py", "app/checkout.py", "app/legacy_pricing.py", "app/models.py", "app/pricing.py",
        "go/cmd/main.go", "go/internal/tax/tax.go", "java/com/shop/Cart.java", "java/com/shop/model/Item.java",
        "kotlin/com/shop/Report.kt", "kotlin/com/shop/model/Summary.kt", "storage/db.py", "web/api.ts",
        "web/format.ts", "web/helpers.js",
    ]
    for forbidden in FORBIDDEN:
        assert forbidden not in index.files
    every_text = "".join(e.text for e in index.files.values())
    assert "LEAK_" not in every_text and OUTSIDE_MARKER not in every_text
    assert index.skipped["symlink"] == 3  # linked_outside/, app/stolen.py, app/pricing_link.py
    assert index.skipped["secret"] >= 2 and index.skipped["binary"] == 1 and index.skipped["huge"] == 1
    assert index.skipped["generated"] == 2  # DO NOT EDIT header, minified line lengths


def test_update_overrides_disk_and_is_incremental(shop):
    index = ProjectIndex(shop.root, CONFIG)
    before = {p: e for p, e in index.files.items() if p != "app/pricing.py"}
    assert index.update("app/pricing.py", "def price_with_shipping(amount):\n    return amount + SHIPPING_FEE\n")
    assert "SHIPPING_FEE" in index.files["app/pricing.py"].text
    assert index.definitions_of("price_with_shipping") == [("app/pricing.py", 0)]
    assert "app/pricing.py" not in {p for p, _ in index.definitions_of("apply_discount")}  # old definitions gone
    assert all(index.files[p] is e for p, e in before.items())  # other files untouched
    hits = index.bm25(["SHIPPING_FEE"], top_k=5)
    assert [index.chunks[c].path for c, _ in hits] == ["app/pricing.py"]
    assert index.recent(1) == ["app/pricing.py"]
    # An unsaved buffer for a new file joins the index; a deleted file leaves it.
    assert index.update(shop.root / "app" / "draft.py", "DRAFT_MARKER = 1\n")
    assert "app/draft.py" in index.files
    (shop.root / "storage" / "db.py").unlink()
    assert not index.update("storage/db.py")
    assert "storage/db.py" not in index.files and not index.bm25(["lastrowid"], top_k=5)


def test_update_refuses_secret_ignored_and_outside_files(shop):
    index = ProjectIndex(shop.root, CONFIG)
    assert not index.update(".env", "API_KEY=LEAK")
    assert not index.update("app/creds.py", "-----BEGIN PRIVATE KEY-----\nLEAK\n")
    assert not index.update("build/new.py", "x = 1  # LEAK")  # inside a gitignored folder
    assert not index.update("storage/cache_x.py", "x = 1  # LEAK")  # nested .gitignore
    assert not index.update("app/stolen.py", "x = 1  # LEAK")  # symlink resolving outside the root
    assert not index.update(shop.outside / "stolen.py", "x = 1")
    assert not index.update("app/big.py", "x = 1\n" * 20_000)  # over max_file_bytes
    assert not index.update("app/gen.py", "// Code generated by tool. DO NOT EDIT.\nx = 1\n")
    # A file that becomes secret-looking leaves the index.
    assert not index.update("app/models.py", "TOKEN = 'ghp_" + "a" * 36 + "'\n")
    assert "app/models.py" not in index.files
    assert "LEAK" not in "".join(e.text for e in index.files.values())


def test_compaction_after_many_updates_keeps_results(shop):
    index = ProjectIndex(shop.root, ContextConfig(max_file_bytes=20_000, rebuild_after_updates=3))
    for i in range(7):
        index.update("app/pricing.py", f"def apply_discount(amount, rate):\n    return amount * (1 - rate) - {i}\n")
    hits = index.bm25(["apply_discount"], top_k=10)
    paths = sorted(index.chunks[c].path for c, _ in hits)
    assert paths == ["app/checkout.py", "app/legacy_pricing.py", "app/pricing.py"]
    assert all(index.chunks[c] is not None for c, _ in hits)
    # Compaction ran (after updates 3 and 6): postings hold at most one replaced chunk besides the 3 live ones.
    assert len(index._post_ids["apply_discount"]) <= 4


def test_definitions_per_language():
    assert definitions("class A:\n    def run(self):\n        pass\nLIMIT = 3\n", "python") == [("A", 0), ("run", 1), ("LIMIT", 3)]
    assert [n for n, _ in definitions("export function f() {}\nconst g = 1\nexport interface Shape {}\n", "typescript")] == ["f", "g", "Shape"]
    assert [n for n, _ in definitions("func (s *S) Apply() {}\ntype Rate float64\n", "go")] == ["Apply", "Rate"]
    assert [n for n, _ in definitions("data class Summary(val n: Int)\nfun describe() = 1\n", "kotlin")] == ["Summary", "describe"]
    assert [n for n, _ in definitions("public class Item {\n    public int total(int x) {\n", "java")] == ["Item", "total"]


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ProjectIndex(tmp_path / "nope")


def test_malformed_gitignore_line_is_skipped_not_fatal(tmp_path):
    (tmp_path / ".gitignore").write_text("[z-a]*.py\n*.log\n")  # git lets a bad range match nothing
    (tmp_path / "app.py").write_text("def total(items):\n    return sum(items)\n")
    (tmp_path / "debug.log").write_text("noise\n")
    assert len(parse_rules(["[z-a]*.py", "*.log"])) == 1
    index = ProjectIndex(tmp_path, CONFIG)
    assert list(index.files) == ["app.py"]
    assert index.ignored("debug.log")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_named_pipe_is_skipped_not_read(tmp_path):
    # Opening a FIFO for reading waits for a writer: the walk must not open anything but regular files.
    (tmp_path / "app.py").write_text("def total(items):\n    return sum(items)\n")
    os.mkfifo(tmp_path / "pipe.py")
    built: list[ProjectIndex] = []
    walker = threading.Thread(target=lambda: built.append(ProjectIndex(tmp_path, CONFIG)), daemon=True)
    walker.start()
    walker.join(timeout=20)
    if walker.is_alive():  # release the blocked reader before failing
        fd = os.open(tmp_path / "pipe.py", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        walker.join(timeout=5)
        pytest.fail("indexing blocked on a named pipe")
    assert list(built[0].files) == ["app.py"] and built[0].skipped["special"] == 1


def test_chunk_lines_agree_with_definition_lines_across_form_feeds(tmp_path):
    # Form feeds (Emacs page breaks) and U+2028 are line ends to `str.splitlines` but not to editors or to the
    # definitions table: chunks cut by splitlines drifted one line per form feed, so the definitions source handed
    # out a chunk of the function above instead of the one defining the name.
    body = "import os\n\x0c\n" + "".join(
        f"def helper_{i}(a, b):\n" + "".join(f"    v{j} = a + b * {j}  # \u2028\n" for j in range(12)) + "    return v0\n\n\x0c\n"
        for i in range(6)
    )
    (tmp_path / "lib.py").write_text(body)
    index = ProjectIndex(tmp_path, CONFIG)
    [(path, line)] = index.definitions_of("helper_5")
    assert body.split("\n")[line].startswith("def helper_5(")
    chunk = index.chunk_at(path, line)
    assert "def helper_5(" in chunk.text
    assert chunk.text == "".join(body.split("\n")[chunk.start_line : chunk.end_line][i] + "\n"
                                 for i in range(chunk.end_line - chunk.start_line))


def test_definitions_of_methods_and_grouped_declarations():
    # Methods are what a completion after `store.` calls: JS/TS class and object methods, Java methods without
    # modifiers (package-private, interfaces), and Go's grouped `const (...)` / `var (...)` / `type (...)` names.
    ts = ("export class Store {\n  constructor(private path: string) {}\n"
          "  async saveItem(key: string, item: Item): Promise<void> {\n    if (key) {\n      log(key);\n    }\n"
          "    items.forEach((x) => {\n    });\n    describe(\"x\", function () {\n    });\n  }\n"
          "  get size(): number {\n    return 1;\n  }\n}\nconst api = {\n  fetchUser(id) {\n    return id;\n  },\n};\n"
          "export abstract class Base {}\n")
    assert definitions(ts, "typescript") == [("Store", 0), ("constructor", 1), ("saveItem", 2), ("size", 11),
                                             ("api", 15), ("fetchUser", 16), ("Base", 20)]
    java = ("interface Repo {\n    Item find(String id);\n}\nclass Store {\n    void saveItem(String k, Item v) {\n"
            "        Item item = new Item(k);\n        return foo(k);\n        throw new Error(k);\n        else bar(k);\n"
            "        assert check(k);\n    }\n    List<Map<String, Item>> groups(int n) throws IOException {\n    }\n}\n")
    assert definitions(java, "java") == [("Repo", 0), ("find", 1), ("Store", 3), ("saveItem", 4), ("groups", 11)]
    go = ('package p\n\nconst (\n\tRed Color = iota\n\tGreen\n\t// comment\n)\n\nvar (\n\tErrX = errors.New("x")\n'
          '\tcfg = Config{\n\t\tName: "x",\n\t}\n)\n\nfunc New() *S { return nil }\n')
    assert definitions(go, "go") == [("Red", 3), ("Green", 4), ("ErrX", 9), ("cfg", 10), ("New", 15)]


def test_hand_written_files_that_mention_generation_stay_in_the_index(tmp_path):
    """The index dropped any file whose head held "DO NOT EDIT" or "auto-generated" anywhere, as the corpus filter
    did before it learned to look for notices about the file itself; hand-written modules lost their context."""
    (tmp_path / "version.py").write_text('__version__ = "2.0.1"  # DO NOT EDIT THIS LINE MANUALLY\n')
    (tmp_path / "ids.py").write_text('"""Helpers for auto-generated ids."""\n\ndef new_id():\n    return 1\n')
    (tmp_path / "pb.py").write_text("# Generated by the protocol buffer compiler.  DO NOT EDIT!\nx = 1\n")
    (tmp_path / "gen.go").write_text("// Code generated by stringer. DO NOT EDIT.\npackage gen\n")
    index = ProjectIndex(tmp_path, CONFIG)
    assert sorted(index.files) == ["ids.py", "version.py"] and index.skipped["generated"] == 2
