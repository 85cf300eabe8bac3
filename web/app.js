// The grok3d demo page: submit a prompt or a picture, follow the job (Server-Sent Events from
// /api/status/ID/events, polling /api/status/ID when they break), show the model in <model-viewer>.
// Plain JavaScript with no build step: the server sends this file as it is.

const POLL_MS = 500;
const RETRY_MS = 2000;
// The stages of API.md, in words a visitor understands.
const STAGE_WORDS = {
  queued: "Waiting in the queue",
  initializing: "Starting",
  generating_image: "Painting the picture (xAI Grok)",
  generating_3d: "Building the 3D model (TripoSR)",
  converting_usdz: "Making the AR file (Blender)",
  complete: "Done",
};
const UNREACHABLE = "The server cannot be reached. Check that it is running and your connection works.";
// A server in keys mode (GROK3D_AUTH=keys) answers the job routes 401 without a key: the page asks for one once
// and keeps it in this browser.
const KEY_STORAGE = "grok3d.apiKey";
const KEY_WORDS = {
  "API key required": "This server needs an API key to make models. Ask its operator for one; it is kept in this "
    + "browser only.",
  "Invalid API key": "The server did not accept that API key (unknown or revoked). Enter another one.",
};

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Each action (a submitted prompt, an opened example) takes a new number; a job being followed stops as soon as
// the number moves on, so the most recent action owns the page.
let currentAction = 0;

function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE);
  } catch {
    return null; // storage switched off: the page works like one with no key
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // Nowhere to keep it: it is asked for again on the next load.
  }
}

// RFC 6750 §2.1: the key goes in the Authorization header, never in a URL (URLs end up in logs and histories).
function withKey(options) {
  const key = storedKey();
  if (!key) return options;
  return { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } };
}

class ApiError extends Error {
  constructor(message, status = null) {
    super(message);
    this.status = status; // null: no HTTP answer at all
  }
}

// fetch() plus API.md's error bodies: every failure becomes one sentence for the page.
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, withKey(options));
  } catch {
    throw new ApiError(UNREACHABLE);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON: a proxy's error page, or a server that is not grok3d.
  }
  if (!response.ok) {
    let message = body && typeof body.error === "string" ? body.error
      : `The server answered ${response.status} ${response.statusText}`.trim() + ".";
    const retryAfter = response.headers.get("Retry-After");
    if (response.status === 429 && retryAfter) message += ` (try again in ${retryAfter} s)`;
    throw new ApiError(message, response.status);
  }
  if (body === null) throw new ApiError("The server sent an answer this page cannot read.", response.status);
  return body;
}

function assetUrl(jobId, type) {
  return `/api/asset/${encodeURIComponent(jobId)}?asset_type=${type}`;
}

// The path form of an asset's URL, which ends in the file's extension (AR Quick Look wants one).
function fileUrl(jobId, name) {
  return `/api/jobs/${encodeURIComponent(jobId)}/${name}`;
}

// The downloads under the viewer: link id -> [asset_type, suffix of the saved file's name].
const DOWNLOADS = {
  "dl-image": ["image", "jpg"], "dl-glb": ["glb", "glb"], "dl-usdz": ["usdz", "usdz"],
  "dl-glb_textured": ["glb_textured", "textured.glb"], "dl-obj": ["obj", "obj.zip"], "dl-fbx": ["fbx", "fbx"],
  "dl-stl": ["stl", "stl"], "dl-3mf": ["3mf", "3mf"],
};

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function showProgress(progress, words) {
  $("progress").hidden = false;
  $("bar").value = progress;
  $("stage").textContent = `${words} (${progress}%)`;
}

function hideProgress() {
  $("progress").hidden = true;
}

function setViewerState(state, words) {
  $("viewer").dataset.state = state;
  $("viewer-state").textContent = words;
}

// The object URLs of the keyed result on show, released when another result replaces it.
let keyedUrls = [];

function showResult(jobId, title, mesh = null, urls = null) {
  const viewer = $("viewer");
  const url = (type) => (urls ? urls[type] : assetUrl(jobId, type));
  $("result-title").textContent = title;
  if (viewerInstalled === false) setViewerState("missing", NOT_INSTALLED);
  else setViewerState("loading", "Loading the 3D model…");
  viewer.setAttribute("poster", url("image"));
  // AR Quick Look on iPhone and iPad: the path form, whose URL ends in .usdz (a keyed result: the fetched file).
  viewer.setAttribute("ios-src", urls ? url("usdz") : fileUrl(jobId, "model.usdz"));
  viewer.setAttribute("src", url("glb")); // also what Scene Viewer gets on Android
  for (const [id, [type, suffix]] of Object.entries(DOWNLOADS)) {
    $(id).href = urls && urls[type] ? urls[type] : assetUrl(jobId, type);
    $(id).download = `${jobId}.${suffix}`;
  }
  $("mesh-report").textContent = mesh ? describeMesh(mesh) : "";
  $("result").hidden = false;
  for (const old of keyedUrls) URL.revokeObjectURL(old);
  keyedUrls = urls ? Object.values(urls) : [];
}

// A job's files need the key too when the page has one, and neither <model-viewer>, an <img> nor a download link
// can send a header: the page fetches them itself and hands the viewer object URLs. (Scene Viewer on Android needs
// a URL it can fetch on its own, so with a key AR there goes through WebXR.)
async function showJobResult(jobId, title, action, mesh = null) {
  if (!storedKey()) {
    showResult(jobId, title, mesh);
    return;
  }
  const urls = {};
  try {
    await Promise.all(["image", "glb", "usdz"].map(async (type) => {
      let response;
      try {
        response = await fetch(assetUrl(jobId, type), withKey({}));
      } catch {
        throw new ApiError(UNREACHABLE);
      }
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        throw new ApiError(body && typeof body.error === "string" ? body.error
          : `The server answered ${response.status} ${response.statusText}`.trim() + ".", response.status);
      }
      urls[type] = URL.createObjectURL(await response.blob());
    }));
  } catch (error) {
    for (const made of Object.values(urls)) URL.revokeObjectURL(made);
    if (action === currentAction) showError(error.message);
    return;
  }
  if (action !== currentAction) {
    for (const made of Object.values(urls)) URL.revokeObjectURL(made);
    return;
  }
  showResult(jobId, title, mesh, urls);
}

// What to do again once the visitor has given a key.
let retryWithKey = null;

function askForKey(error, retry) {
  if (error.message === "Invalid API key") storeKey(null); // refused (revoked, or another server's): no use
  retryWithKey = retry;
  hideProgress();
  clearError();
  $("key-message").textContent = KEY_WORDS[error.message] || error.message;
  $("key-form").hidden = false;
  $("api-key").focus();
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) {
    $("api-key").focus();
    return;
  }
  storeKey(key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  const retry = retryWithKey;
  retryWithKey = null;
  if (retry) retry();
}

// API.md's mesh report in words: "20,480 faces · 0.50 × 0.30 × 0.46 m · watertight, 0.036 m³".
function describeMesh(mesh) {
  const size = mesh.size_m.map((side) => side.toFixed(2)).join(" × ");
  const volume = mesh.volume_m3 === null ? "not watertight" : `watertight, ${mesh.volume_m3.toPrecision(2)} m³`;
  return `${mesh.faces.toLocaleString("en")} faces · ${size} m · ${volume}`;
}

// The jobs this browser submitted, newest first, kept in localStorage so they survive a reload.
const JOBS_KEY = "grok3d.jobs";
const JOBS_KEPT = 12;

function savedJobs() {
  try {
    const jobs = JSON.parse(localStorage.getItem(JOBS_KEY) || "[]");
    return Array.isArray(jobs) ? jobs.filter((job) => job && typeof job.job_id === "string") : [];
  } catch {
    return [];
  }
}

function rememberJob(jobId, title) {
  const jobs = [{ job_id: jobId, title }, ...savedJobs().filter((job) => job.job_id !== jobId)];
  try {
    localStorage.setItem(JOBS_KEY, JSON.stringify(jobs.slice(0, JOBS_KEPT)));
  } catch {
    // Storage full or disabled: the list is a convenience.
  }
  showJobs();
}

// A card per job: its preview render (made with the USDZ), its own picture until the preview exists.
function showJobs() {
  const jobs = savedJobs();
  $("jobs").hidden = jobs.length === 0;
  $("job-list").replaceChildren(...jobs.map((job) => card({
    jobId: job.job_id, name: job.title, description: job.job_id,
    picture: fileUrl(job.job_id, "preview.jpg"), fallback: fileUrl(job.job_id, "image.jpg"),
    open: () => follow(job.job_id, startAction(job.job_id)),
  })));
}

function startAction(jobId) {
  currentAction += 1;
  clearError();
  hideProgress();
  // The address names the job, so a reload or a shared link comes back to it.
  history.replaceState(null, "", `#job=${encodeURIComponent(jobId)}`);
  return currentAction;
}

// Show a job's state; true once it has ended (its model or its error is shown).
function showJob(jobId, job) {
  clearError();
  if (job.status === "complete") {
    hideProgress();
    if (storedKey()) showJobResult(jobId, titleOf(job), currentAction, job.mesh); // files fetched with the key
    else showResult(jobId, titleOf(job), job.mesh);
    if (savedJobs().some((saved) => saved.job_id === jobId)) showJobs(); // its card gets the preview now
    return true;
  }
  if (job.status === "error") {
    hideProgress();
    showError(job.error || "The job failed.");
    return true;
  }
  const words = STAGE_WORDS[job.status === "queued" ? "queued" : job.stage] || job.stage;
  showProgress(job.progress, words);
  return false;
}

// Follow the job over Server-Sent Events (API.md §8): one event per state change, then `end`. Resolves true when
// the job's end was shown or another action took over, false when the stream broke (or never opened: a 404 too),
// so the caller polls, which says in words what went wrong.
function followEvents(jobId, action) {
  return new Promise((resolve) => {
    if (typeof EventSource === "undefined") {
      resolve(false);
      return;
    }
    const source = new EventSource(`/api/status/${encodeURIComponent(jobId)}/events`);
    let settled = false;
    const settle = (outcome) => {
      if (settled) return;
      settled = true;
      source.close();
      resolve(outcome);
    };
    const onState = (event) => {
      if (action !== currentAction) {
        settle(true);
        return;
      }
      if (showJob(jobId, JSON.parse(event.data))) settle(true);
    };
    source.addEventListener("status", onState);
    source.addEventListener("end", onState);
    source.addEventListener("error", () => settle(false));
  });
}

// Follow the job until it ends or another action takes over: over its event stream, else by polling. A lost
// connection is retried, not fatal: the job goes on in the server whether or not this page is watching.
async function follow(jobId, action) {
  if (await followEvents(jobId, action)) return;
  while (action === currentAction) {
    let job;
    try {
      job = await api(`/api/status/${encodeURIComponent(jobId)}`);
    } catch (error) {
      if (action !== currentAction) return;
      if (error.status === 401) {
        askForKey(error, () => follow(jobId, startAction(jobId)));
        return;
      }
      if (error.status !== null) { // the server answered: "Job not found" and the like
        hideProgress();
        showError(error.message);
        return;
      }
      showError(`${error.message} Still trying…`);
      await sleep(RETRY_MS);
      continue;
    }
    if (action !== currentAction) return;
    if (showJob(jobId, job)) return;
    await sleep(POLL_MS);
  }
}

function titleOf(job) {
  return job.prompt || (job.source === "upload" ? "Your picture" : job.job_id);
}

// A prompt goes as JSON; a picture as a form, with the words as its caption (API.md §1).
function generateRequest(prompt, picture) {
  if (!picture) {
    return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ prompt }) };
  }
  const form = new FormData();
  form.append("image", picture);
  if (prompt) form.append("prompt", prompt);
  return { method: "POST", body: form };
}

async function submit(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  const picture = $("image").files[0] || null;
  if (!prompt && !picture) {
    showError("Describe an object first, for example “a red teapot”, or give a picture of one.");
    $("prompt").focus();
    return;
  }
  const action = ++currentAction;
  clearError();
  $("result").hidden = true;
  showProgress(0, picture ? "Sending the picture" : "Sending");
  let job;
  try {
    job = await api("/api/generate", generateRequest(prompt, picture));
  } catch (error) {
    if (action !== currentAction) return;
    if (error.status === 401) {
      askForKey(error, () => $("generate-form").requestSubmit());
      return;
    }
    hideProgress();
    showError(error.message);
    return;
  }
  if (action !== currentAction) return;
  rememberJob(job.job_id, prompt || (picture ? picture.name : job.job_id));
  await follow(job.job_id, startAction(job.job_id));
}

function card({ jobId, name, description, picture, fallback = null, open }) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.dataset.jobId = jobId;
  const image = document.createElement("img");
  image.src = picture;
  image.alt = "";
  image.loading = "lazy";
  if (fallback) image.addEventListener("error", () => { if (image.src !== fallback) image.src = fallback; }, { once: true });
  const title = document.createElement("span");
  title.className = "name";
  title.textContent = name;
  const words = document.createElement("span");
  words.className = "description";
  words.textContent = description;
  button.append(image, title, words);
  button.addEventListener("click", () => {
    open();
    $("result").scrollIntoView({ behavior: "smooth", block: "start" });
  });
  item.append(button);
  return item;
}

function exampleCard(example) {
  // An example is complete by definition: it opens at once, with no status round trip.
  return card({
    jobId: example.job_id, name: example.name, description: example.description, picture: example.image_url,
    open: () => { startAction(example.job_id); showResult(example.job_id, example.name); },
  });
}

// The picture field: chosen with the file dialog, or dropped anywhere on its box.
function watchPicture() {
  const drop = $("drop");
  const shown = () => {
    const picture = $("image").files[0];
    $("picked").hidden = !picture;
    $("picked-name").textContent = picture ? `Picture: ${picture.name}` : "";
  };
  $("image").addEventListener("change", shown);
  $("clear-image").addEventListener("click", () => { $("image").value = ""; shown(); });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length > 0) {
      $("image").files = event.dataTransfer.files;
      shown();
    }
  });
}

async function loadExamples() {
  try {
    const { examples } = await api("/api/examples");
    $("example-list").replaceChildren(...examples.map(exampleCard));
    $("examples-state").hidden = examples.length > 0;
    $("examples-state").textContent = "No examples yet.";
  } catch (error) {
    $("examples-state").textContent = `The examples could not be loaded: ${error.message}`;
  }
}

const NOT_INSTALLED = "The 3D viewer is not installed on this server (run make, or npm ci --prefix web), "
  + "so models cannot be shown in 3D here; their downloads still work.";
let viewerInstalled = null; // null while the module loads

// <model-viewer> is served by us from web/node_modules; without it the page still works, minus the 3D view.
async function loadViewer() {
  try {
    await import("/static/model-viewer.min.js");
    viewerInstalled = true;
  } catch {
    viewerInstalled = false;
    $("notice").textContent = NOT_INSTALLED;
    $("notice").hidden = false;
    if (!$("result").hidden) setViewerState("missing", NOT_INSTALLED);
  }
}

function watchViewer() {
  const viewer = $("viewer");
  viewer.addEventListener("load", () => {
    setViewerState("loaded", "Drag to turn the model, pinch or scroll to zoom.");
  });
  viewer.addEventListener("error", () => {
    setViewerState("failed", "The 3D model could not be shown here; the downloads below still work.");
  });
}

// Visitors who asked their system for less motion (the prefers-reduced-motion media feature, Media Queries 5;
// WCAG 2.2 SC 2.3.3) get a model that holds still until they turn it: no auto-rotate, no wiggling prompt. Both would
// also redraw the model every frame for as long as it is shown.
function honourReducedMotion() {
  const viewer = $("viewer");
  const query = matchMedia("(prefers-reduced-motion: reduce)");
  const apply = () => {
    viewer.toggleAttribute("auto-rotate", !query.matches);
    viewer.setAttribute("interaction-prompt", query.matches ? "none" : "auto");
  };
  apply();
  query.addEventListener("change", apply);
}

function resumeFromAddress() {
  const match = /^#job=(.+)$/.exec(location.hash);
  if (match) {
    const jobId = decodeURIComponent(match[1]);
    follow(jobId, startAction(jobId));
  }
}

$("generate-form").addEventListener("submit", submit);
watchPicture();
$("key-form").addEventListener("submit", saveKey);
watchViewer();
honourReducedMotion();
showJobs();
loadViewer();
loadExamples();
resumeFromAddress();
