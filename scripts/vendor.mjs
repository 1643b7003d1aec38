// Copy the page's front-end libraries from node_modules into static/vendor/ (run with
// `npm run vendor` after `npm ci`). The copies are committed, so serving the page needs no
// node; this script only refreshes them when package.json's pinned versions change.
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const modules = join(root, "node_modules");
const target = join(root, "static", "vendor");

// [package, file inside the package, name in static/vendor/]
const FILES = [
  ["marked", "lib/marked.esm.js", "marked.esm.js"],
  ["marked", "LICENSE", "marked.LICENSE"],
  ["dompurify", "dist/purify.es.mjs", "purify.es.js"],
  ["dompurify", "LICENSE", "dompurify.LICENSE"],
  // The "common languages" build (about 40 languages) as one ES module.
  ["@highlightjs/cdn-assets", "es/highlight.min.js", "highlight.min.js"],
  ["@highlightjs/cdn-assets", "styles/github.min.css", "hljs-light.css"],
  ["@highlightjs/cdn-assets", "styles/github-dark.min.css", "hljs-dark.css"],
  ["@highlightjs/cdn-assets", "LICENSE", "highlight.js.LICENSE"],
];

function version(name) {
  return JSON.parse(readFileSync(join(modules, name, "package.json"), "utf8")).version;
}

rmSync(target, { recursive: true, force: true });
mkdirSync(target, { recursive: true });
const manifest = {};
for (const [name, from, to] of FILES) {
  copyFileSync(join(modules, name, from), join(target, to));
  manifest[to] = `${name}@${version(name)}/${from}`;
}
writeFileSync(join(target, "VERSIONS.json"), JSON.stringify(manifest, null, 2) + "\n");
console.log(`copied ${FILES.length} files into static/vendor/`);
