"""A real editor as the client: headless Neovim (Debian's 0.7.2 API: `vim.lsp.start_client`) starts `mellum lsp`,
opens a file of the sample project, sends `textDocument/inlineCompletion` from Lua, reports a telemetry event,
and writes what it received to a JSON file."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import pytest

from .conftest import PYTHON, server_env

pytestmark = pytest.mark.timeout(150)

LUA = r"""
local env = vim.env
local out = env.MELLUM_OUT
local report = {}
local function finish()
  local f = io.open(out, "w")
  f:write(vim.fn.json_encode(report))
  f:close()
  vim.cmd("qa!")
end

local root = env.MELLUM_ROOT
local client_id = vim.lsp.start_client({
  name = "mellum",
  cmd = {env.MELLUM_PYTHON, "-m", "mellum.cli", "lsp", "--model", env.MELLUM_MODEL, "--telemetry", env.MELLUM_DB},
  cmd_env = {PYTHONPATH = env.PYTHONPATH, HF_HUB_OFFLINE = "1"},
  root_dir = root,
  workspace_folders = {{uri = vim.uri_from_fname(root), name = "project"}},
  init_options = {maxNewTokens = 16, debounceMs = 0},
})
report.client_id = client_id
local client = vim.lsp.get_client_by_id(client_id)
local ok = vim.wait(60000, function() return client.initialized end, 50)
report.initialized = ok
if not ok then return finish() end
report.inline_provider = client.server_capabilities.inlineCompletionProvider ~= nil

vim.cmd("edit " .. env.MELLUM_FILE)
local bufnr = vim.api.nvim_get_current_buf()
vim.lsp.buf_attach_client(bufnr, client_id)

local done = false
local params = {
  textDocument = {uri = vim.uri_from_bufnr(bufnr)},
  position = {line = tonumber(env.MELLUM_LINE), character = 4},
  context = {triggerKind = 1},
}
client.request("textDocument/inlineCompletion", params, function(err, result)
  report.err = err
  report.result = result
  done = true
end, bufnr)
report.answered = vim.wait(60000, function() return done end, 20)

if report.result and report.result.items and report.result.items[1] then
  local id = report.result.items[1].command.arguments[1]
  client.notify("mellum/telemetry", {id = id, event = "accepted"})
  local status_done = false
  client.request("mellum/status", {}, function(err, result)
    report.status = result
    status_done = true
  end, bufnr)
  vim.wait(20000, function() return status_done end, 20)
end
client.stop()
vim.wait(5000, function() return client.is_stopped() end, 50)
finish()
"""


def test_neovim_receives_inline_completions(tiny_model_dir, workspace, tmp_path):
    nvim = shutil.which("nvim")
    if nvim is None:
        pytest.skip("nvim not installed (`./run setup` installs it: apt-get install neovim)")
    path = workspace / "shop" / "pricing.py"
    line = path.read_text().splitlines().index("def cart_total(cart: Cart) -> Decimal:") + 1
    script = tmp_path / "client.lua"
    script.write_text(LUA)
    out, db = tmp_path / "nvim.json", tmp_path / "telemetry.db"
    env = dict(server_env(), MELLUM_OUT=str(out), MELLUM_ROOT=str(workspace), MELLUM_PYTHON=PYTHON,
               MELLUM_MODEL=str(tiny_model_dir), MELLUM_DB=str(db), MELLUM_FILE=str(path), MELLUM_LINE=str(line),
               XDG_STATE_HOME=str(tmp_path / "state"), XDG_DATA_HOME=str(tmp_path / "data"))
    proc = subprocess.run([nvim, "--headless", "--clean", "-n", "-c", f"luafile {script}"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert out.is_file(), f"neovim wrote no report (rc={proc.returncode}): {proc.stderr[-2000:]}"
    report = json.loads(out.read_text())
    assert report["initialized"] and report["inline_provider"], report
    assert report["answered"] and report.get("err") is None, report
    items = report["result"]["items"]
    assert len(items) == 1 and isinstance(items[0]["insertText"], str) and items[0]["insertText"].strip()
    assert items[0]["range"]["start"] == {"line": line, "character": 4}
    cid = items[0]["command"]["arguments"][0]
    assert report["status"]["served"] >= 1
    rows = sqlite3.connect(db).execute("SELECT event FROM events WHERE completion_id = ?", (cid,)).fetchall()
    assert rows == [("accepted",)]
