#!/usr/bin/env bash
# Install the real clients pinned in package.json into tests/clients/node_modules, once.
# Idempotent: does nothing when the installed versions already match the pins and `claude`
# runs. No lock file is written (it would record the registry's address).
set -euo pipefail
cd "$(dirname "$0")"

for tool in node npm; do
    command -v "$tool" >/dev/null || { echo "install.sh: $tool is not on PATH" >&2; exit 1; }
done

# "name version" per pinned dependency whose installed copy is missing or of another version.
stale() {
    node -e '
        const fs = require("fs");
        const pins = require("./package.json").dependencies;
        for (const [name, want] of Object.entries(pins)) {
            let have = null;
            try { have = JSON.parse(fs.readFileSync(`node_modules/${name}/package.json`)).version; }
            catch { /* not installed */ }
            if (have !== want) console.log(`${name} ${have ?? "missing"} (want ${want})`);
        }'
}

claude_runs() {
    node_modules/.bin/claude --version >/dev/null 2>&1
}

if [[ -z "$(stale)" ]] && claude_runs; then
    exit 0
fi

echo "install.sh: installing $(node -p 'Object.entries(require("./package.json").dependencies).map(([n, v]) => n + "@" + v).join(" ")')" >&2
npm install --no-audit --no-fund --no-package-lock --loglevel=error

if [[ -n "$(stale)" ]]; then
    echo "install.sh: still not at the pinned versions after npm install:" >&2
    stale >&2
    exit 1
fi

# Claude Code's package puts its native binary in place from a postinstall script; an npm that
# does not run install scripts leaves a stub behind. The script is the package's own.
if ! claude_runs; then
    node node_modules/@anthropic-ai/claude-code/install.cjs
fi
claude_runs || { echo "install.sh: node_modules/.bin/claude does not run" >&2; exit 1; }
echo "install.sh: $(node_modules/.bin/claude --version)" >&2
