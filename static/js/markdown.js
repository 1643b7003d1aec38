// Model Markdown -> a sanitized DOM fragment, with highlighted code blocks.
//
// Two layers keep model output inert: raw HTML in the Markdown is shown as text (never
// parsed), and the HTML that marked produces goes through DOMPurify before it reaches the
// page. Images are shown as links: an <img> would fetch its URL without a click, which a
// prompt injection could use to send the conversation elsewhere.

import { Marked } from "../vendor/marked.esm.js";
import DOMPurify from "../vendor/purify.es.js";
import hljs from "../vendor/highlight.min.js";
import { copyButton, el } from "./dom.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

const LANGUAGE_NAMES = { js: "javascript", ts: "typescript", py: "python", sh: "bash",
  shell: "bash", zsh: "bash", yml: "yaml", html: "xml", htm: "xml", "c++": "cpp" };

function languageOf(lang) {
  const name = (lang || "").trim().split(/\s+/)[0].toLowerCase();
  return LANGUAGE_NAMES[name] || name;
}

const marked = new Marked({
  gfm: true,
  breaks: true, // one newline is a line break, as in every chat product (poems, lists)
  renderer: {
    html({ text, block }) {
      const shown = escapeHtml(text.replace(/\n+$/, ""));
      return block ? `<p class="raw-html">${shown}</p>\n` : shown;
    },
    code({ text, lang }) {
      const label = (lang || "").trim().split(/\s+/)[0];
      const language = languageOf(lang);
      const known = Boolean(language && hljs.getLanguage(language));
      const body = known
        ? hljs.highlight(text, { language, ignoreIllegals: true }).value
        : escapeHtml(text);
      const cls = known ? `hljs language-${language}` : "hljs";
      return `<pre><code class="${escapeHtml(cls)}" data-label="${escapeHtml(label)}">${body}</code></pre>\n`;
    },
    image({ href, text }) {
      const label = text ? `Image: ${text}` : "Image";
      return `<a href="${escapeHtml(href || "")}">${escapeHtml(label)}</a>`;
    },
  },
});

const PURIFY = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "button", "textarea", "select",
    "iframe", "object", "embed", "video", "audio", "source", "picture"],
  FORBID_ATTR: ["style", "id", "name"],
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** A copy button and language label above each code block. */
function decorateCodeBlocks(fragment) {
  for (const pre of fragment.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    if (!code) continue;
    const label = code.dataset.label || "";
    const header = el("div", { class: "code-header" },
      el("span", { class: "code-language", text: label || "code" }),
      copyButton(label ? `Copy ${label} code` : "Copy code", () => code.textContent,
        { text: "Copy code" }));
    const block = el("div", { class: "code-block" });
    pre.replaceWith(block);
    block.append(header, pre);
  }
  for (const table of fragment.querySelectorAll("table")) {
    const scroller = el("div", { class: "table-scroll" });
    table.replaceWith(scroller);
    scroller.append(table);
  }
}

/** The sanitized, highlighted DOM for a Markdown text (partial Markdown is fine). */
export function renderMarkdown(text) {
  const html = marked.parse(text || "");
  const fragment = DOMPurify.sanitize(html, PURIFY);
  decorateCodeBlocks(fragment);
  return fragment;
}
