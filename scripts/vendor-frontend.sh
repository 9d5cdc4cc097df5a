#!/usr/bin/env bash
# Refresh the web UI's front-end libraries under web/static/vendor/ from the npm registry.
#
#   scripts/vendor-frontend.sh            # the pinned versions below
#   scripts/vendor-frontend.sh latest     # the newest release of each (then review and commit)
#
# Only built browser files (ES modules, CSS) and each package's licence are copied; nothing is
# fetched at run time and no bundler is needed. Versions and licences go to vendor/VENDOR.md.
set -euo pipefail
cd "$(dirname "$0")/.."

MARKED=18.2.1
DOMPURIFY=3.4.18
HIGHLIGHT=11.12.0
if [[ "${1:-}" == "latest" ]]; then
    MARKED=latest DOMPURIFY=latest HIGHLIGHT=latest
fi

command -v npm >/dev/null || { echo "npm is required (Node.js 18+)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
npm install --prefix "$tmp" --no-save --ignore-scripts --no-audit --no-fund --loglevel=error \
    "marked@$MARKED" "dompurify@$DOMPURIFY" "@highlightjs/cdn-assets@$HIGHLIGHT" >/dev/null

nm="$tmp/node_modules"
out=web/static/vendor
rm -rf "$out"
mkdir -p "$out/marked" "$out/dompurify" "$out/highlight"

# copy a built file without its sourceMappingURL comment (the maps are not shipped)
copy() { sed '/^\/\/# sourceMappingURL=/d' "$1" > "$2"; }

copy "$nm/marked/lib/marked.esm.js" "$out/marked/marked.esm.js"
cp "$nm/marked/LICENSE" "$out/marked/LICENSE"

copy "$nm/dompurify/dist/purify.es.mjs" "$out/dompurify/purify.es.mjs"
cp "$nm/dompurify/LICENSE" "$out/dompurify/LICENSE"          # Apache-2.0
cp "$nm/dompurify/LICENSE-MPL" "$out/dompurify/LICENSE-MPL"  # MPL-2.0 (dual licensed)

copy "$nm/@highlightjs/cdn-assets/es/highlight.min.js" "$out/highlight/highlight.min.js"
cp "$nm/@highlightjs/cdn-assets/styles/github.min.css" "$out/highlight/github.min.css"
cp "$nm/@highlightjs/cdn-assets/styles/github-dark.min.css" "$out/highlight/github-dark.min.css"
cp "$nm/@highlightjs/cdn-assets/LICENSE" "$out/highlight/LICENSE"

version() { node -p "require('$nm/$1/package.json').version"; }
license() { node -p "require('$nm/$1/package.json').license"; }
{
    echo "# Vendored front-end libraries"
    echo
    echo "Built files copied from the npm registry by \`scripts/vendor-frontend.sh\`; do not edit by hand."
    echo "Nothing is loaded from a CDN: the web UI imports these files from \`/ui/vendor/\`."
    echo
    echo "| package | version | licence | files |"
    echo "|---|---|---|---|"
    echo "| [marked](https://www.npmjs.com/package/marked) | $(version marked) | $(license marked) | \`marked/marked.esm.js\` (from \`lib/\`), \`marked/LICENSE\` |"
    echo "| [dompurify](https://www.npmjs.com/package/dompurify) | $(version dompurify) | $(license dompurify) | \`dompurify/purify.es.mjs\` (from \`dist/\`), \`dompurify/LICENSE\` |"
    echo "| [@highlightjs/cdn-assets](https://www.npmjs.com/package/@highlightjs/cdn-assets) | $(version @highlightjs/cdn-assets) | $(license @highlightjs/cdn-assets) | \`highlight/highlight.min.js\` (from \`es/\`, common languages), \`highlight/github.min.css\`, \`highlight/github-dark.min.css\`, \`highlight/LICENSE\` |"
} > "$out/VENDOR.md"
echo "vendored into $out:"
sed -n '/^| \[/p' "$out/VENDOR.md" | cut -d'|' -f2-4
