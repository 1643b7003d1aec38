// The JSON API. Every failure becomes an ApiError with the server's {code, message}.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Called when the server answers 401 login_required: the sign-in is gone (signed out on
// another device, the account disabled). account.js sets it to show the sign-in screen.
let loginRequired = () => {};

export function onLoginRequired(handler) {
  loginRequired = handler;
}

async function request(method, url, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch {
    throw new ApiError(0, "network", "Could not reach the server. Check your connection.");
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    if (response.status === 401 && error.code === "login_required") loginRequired();
    throw new ApiError(
      response.status,
      error.code || "http_error",
      error.message || `The server answered ${response.status} ${response.statusText}.`,
    );
  }
  return data;
}

const conversation = (cid) => `/api/conversations/${encodeURIComponent(cid)}`;
const generation = (gid) => `/api/generations/${encodeURIComponent(gid)}`;

export const api = {
  models: () => request("GET", "/api/models"),
  conversations: async () => (await request("GET", "/api/conversations")).conversations,
  createConversation: () => request("POST", "/api/conversations"),
  conversation: (cid) => request("GET", conversation(cid)),
  updateConversation: (cid, changes) => request("PATCH", conversation(cid), changes),
  deleteConversation: (cid) => request("DELETE", conversation(cid)),
  send: (cid, content, model) =>
    request("POST", `${conversation(cid)}/messages`, model ? { content, model } : { content }),
  regenerate: (cid, model) =>
    request("POST", `${conversation(cid)}/regenerate`, model ? { model } : {}),
  generation: (gid) => request("GET", generation(gid)),
  cancel: (gid) => request("POST", `${generation(gid)}/cancel`),
  continueAnswer: (gid) => request("POST", `${generation(gid)}/continue`),
  me: () => request("GET", "/api/auth/me"),
  signUp: (fields) => request("POST", "/api/auth/signup", fields),
  logIn: (fields) => request("POST", "/api/auth/login", fields),
  logOut: (everywhere = false) =>
    request("POST", "/api/auth/logout", everywhere ? { everywhere: true } : undefined),
  users: async () => (await request("GET", "/api/admin/users")).users,
  setUserDisabled: (uid, disabled) =>
    request("PATCH", `/api/admin/users/${encodeURIComponent(uid)}`, { disabled }),
  createInvite: () => request("POST", "/api/admin/invites"),
  // The operator's view: answers running and queued, workers, recent errors, queue depth.
  answers: () => request("GET", "/api/admin/answers"),
  stopAnswer: (gid) =>
    request("POST", `/api/admin/generations/${encodeURIComponent(gid)}/cancel`),
  keys: async () => (await request("GET", "/api/keys")).keys,
  createKey: (name) => request("POST", "/api/keys", { name }),
  revokeKey: (id) => request("DELETE", `/api/keys/${encodeURIComponent(id)}`),
  eventsUrl: (gid, after) =>
    `${generation(gid)}/events${after ? `?after=${encodeURIComponent(after)}` : ""}`,
};

export const FINAL_STATUSES = new Set(["done", "error", "cancelled", "interrupted"]);
