// Small DOM helpers. Text always goes in through textContent; the only HTML the page
// inserts is the sanitized fragment that markdown.js builds.

/**
 * Build an element: el("button", { class: "x", text: "Hi", type: "button",
 * on: { click: fn } }, child, ...). Other props become attributes (null/false: left out).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name === "on") {
      for (const [type, handler] of Object.entries(value)) node.addEventListener(type, handler);
    } else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

// Outline icons (24x24, stroke), drawn with DOM calls rather than markup.
const ICONS = {
  plus: ["M12 5v14", "M5 12h14"],
  menu: ["M4 6h16", "M4 12h16", "M4 18h16"],
  close: ["M6 6l12 12", "M18 6L6 18"],
  pencil: ["M4 20h4L19 9l-4-4L4 16v4z", "M13.5 6.5l4 4"],
  trash: ["M4 7h16", "M10 11v6", "M14 11v6", "M6 7l1 13h10l1-13", "M9 7V4h6v3"],
  copy: ["M9 9h11v11H9z", "M5 15H4V4h11v1"],
  check: ["M5 12l5 5L20 7"],
  refresh: ["M20 11a8 8 0 1 0-2.3 5.7", "M20 4v7h-7"],
  send: ["M12 19V5", "M5 12l7-7 7 7"],
  stop: ["M7 7h10v10H7z"],
  sliders: ["M4 6h10", "M18 6h2", "M4 12h4", "M12 12h8", "M4 18h12", "M20 18h0",
    "M16 4v4", "M10 10v4", "M16 16v4"],
  chat: ["M4 5h16v11H9l-5 4z"],
  down: ["M12 5v14", "M5 12l7 7 7-7"],
};

export function icon(name) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  svg.setAttribute("class", "icon");
  for (const d of ICONS[name] || []) {
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", d);
    svg.append(path);
  }
  return svg;
}

/** A button with an icon; `label` is its accessible name (and tooltip) unless it shows text. */
export function iconButton(name, label, { text, className = "icon-button", onClick, ...rest } = {}) {
  const button = el("button", {
    type: "button",
    class: className,
    title: label,
    "aria-label": text ? null : label,
    on: onClick ? { click: onClick } : {},
    ...rest,
  }, icon(name));
  if (text) button.append(el("span", { text }));
  return button;
}

/** Say something to screen readers through the page's polite live region. */
export function announce(message) {
  const region = document.getElementById("announcer");
  if (!region) return;
  region.textContent = "";
  // A fresh text node after a tick makes screen readers repeat identical messages too.
  setTimeout(() => { region.textContent = message; }, 50);
}

export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // fall through to the textarea route (e.g. permission refused)
    }
  }
  const area = el("textarea", { class: "visually-hidden", readonly: true, "aria-hidden": "true" });
  area.value = text;
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}

/** A button that copies `getText()`, then says "Copied" (or shows a tick) for a moment. */
export function copyButton(label, getText, { text } = {}) {
  const button = iconButton("copy", label, { text, className: text ? "text-button" : "icon-button" });
  let timer = 0;
  const show = (iconName, caption, title) => {
    button.querySelector("svg").replaceWith(icon(iconName));
    const span = button.querySelector("span");
    if (span) span.textContent = caption;
    button.title = title;
  };
  button.addEventListener("click", async () => {
    const ok = await copyText(getText());
    show(ok ? "check" : "copy", ok ? "Copied" : "Copy failed", ok ? "Copied" : "Copy failed");
    button.classList.toggle("copied", ok);
    announce(ok ? "Copied to clipboard" : "Could not copy");
    clearTimeout(timer);
    timer = setTimeout(() => {
      button.classList.remove("copied");
      show("copy", text, label);
    }, 1500);
  });
  return button;
}

/** Call fn at most once per animation frame (and at least every 100 ms, even hidden). */
export function throttled(fn) {
  let frame = 0;
  let timer = 0;
  const run = () => {
    cancelAnimationFrame(frame);
    clearTimeout(timer);
    frame = 0;
    timer = 0;
    fn();
  };
  const schedule = () => {
    if (frame || timer) return;
    frame = requestAnimationFrame(run);
    timer = setTimeout(run, 100);
  };
  schedule.flush = () => { if (frame || timer) run(); };
  schedule.cancel = () => {
    cancelAnimationFrame(frame);
    clearTimeout(timer);
    frame = 0;
    timer = 0;
  };
  return schedule;
}
