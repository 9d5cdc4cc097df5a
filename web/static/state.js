// The page's shared state and what it remembers in the browser (localStorage, under `ortllm.`).

export const $ = (id) => document.getElementById(id);

export const store = {
  get(key, fallback = null) {
    try {
      const raw = localStorage.getItem(`ortllm.${key}`);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      if (value === null || value === undefined) localStorage.removeItem(`ortllm.${key}`);
      else localStorage.setItem(`ortllm.${key}`, JSON.stringify(value));
    } catch {
      /* storage disabled */
    }
  },
};

/** The sampling settings before the user or the model's own parameters change them. */
export const DEFAULTS = { temperature: 0.7, top_p: 0.9, top_k: 40, max_tokens: 512, repeat_penalty: 1.1 };

export const state = {
  models: [],
  modelsError: "",
  model: store.get("model", ""),
  sessions: [],
  current: null, // {id, title, model, system_prompt}
  messages: [], // {role, content, stored, note, error, el}
  streaming: null, // {assistant, user, cancel, sentAt, firstAt, lastAt, count, cancelled}
  settings: { ...DEFAULTS, ...(store.get("settings") || {}) },
  stopText: store.get("stop", ""),
  systemDefault: store.get("system", ""),
  editing: null,
};

/** The model picked in the top bar, as /api/models describes it. */
export function currentModelObject() {
  return state.models.find((m) => m.name === state.model);
}
