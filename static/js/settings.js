// A conversation's settings: model (the picker in the top bar), system prompt and
// temperature (the settings panel). The app saves them; this module only shows and reads.

import { el } from "./dom.js";

const $ = (id) => document.getElementById(id);

export class Settings {
  /** onChange(changes): called with {model} / {system_prompt} / {temperature}. */
  constructor(onChange) {
    this.onChange = onChange;
    this.catalog = { default: "", models: [], backend: "" };
    this.picker = $("model-picker");
    this.prompt = $("system-prompt");
    this.temperature = $("temperature");
    this.status = $("settings-status");
    this.panel = $("settings-panel");
    this.toggle = $("settings-toggle");
    this.saved = { system_prompt: null, temperature: null };

    this.picker.addEventListener("change", () => {
      this.showModel();
      this.onChange({ model: this.picker.value });
    });
    this.prompt.addEventListener("change", () => this.commitPrompt());
    this.temperature.addEventListener("change", () => this.commitTemperature());
    this.toggle.addEventListener("click", () => this.setOpen(this.panel.hidden));
    this.panel.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        this.setOpen(false);
        this.toggle.focus();
      }
    });
  }

  setCatalog(catalog) {
    this.catalog = catalog;
    const current = this.picker.value;
    this.fillPicker(current || catalog.default);
  }

  fillPicker(selected) {
    const names = [...this.catalog.models];
    if (selected && !names.includes(selected)) names.push(selected);
    if (!names.length && selected) names.push(selected);
    this.picker.replaceChildren(...names.map((name) =>
      el("option", { value: name, text: name === this.catalog.default ? `${name} (default)` : name })));
    this.picker.value = selected || this.catalog.default;
    this.showModel();
  }

  get model() {
    return this.picker.value || this.catalog.default;
  }

  /** Show a conversation's settings (or a new chat's). */
  show({ model, system_prompt: prompt, temperature }) {
    this.fillPicker(model || this.catalog.default);
    this.saved = { system_prompt: prompt ?? null, temperature: temperature ?? null };
    this.prompt.value = prompt || "";
    this.temperature.value = temperature === null || temperature === undefined ? "" : String(temperature);
    this.temperature.setCustomValidity("");
    this.setStatus("");
    this.toggle.classList.toggle("has-settings", Boolean(prompt) || temperature != null);
  }

  showModel() {
    const backend = this.catalog.backend;
    $("backend-line").textContent = backend
      ? `Model ${this.model} on ${backend}.`
      : `Model ${this.model}.`;
    this.picker.title = `Model: ${this.model}`;
  }

  commitPrompt() {
    const value = this.prompt.value.trim() ? this.prompt.value : null;
    if (value === this.saved.system_prompt) return;
    this.saved.system_prompt = value;
    this.onChange({ system_prompt: value });
  }

  commitTemperature() {
    const raw = this.temperature.value.trim();
    const value = raw === "" ? null : Number(raw);
    if (value !== null && (!Number.isFinite(value) || value < 0 || value > 2)) {
      this.temperature.setCustomValidity("Temperature must be from 0 to 2.");
      this.temperature.reportValidity();
      return;
    }
    this.temperature.setCustomValidity("");
    if (value === this.saved.temperature) return;
    this.saved.temperature = value;
    this.onChange({ temperature: value });
  }

  setStatus(text) {
    this.status.textContent = text;
    const saved = this.saved;
    this.toggle.classList.toggle("has-settings",
      Boolean(saved.system_prompt) || saved.temperature != null);
  }

  setOpen(open) {
    this.panel.hidden = !open;
    this.toggle.setAttribute("aria-expanded", String(open));
    if (open) this.prompt.focus();
  }
}
