// The grok3d demo page: submit a prompt, follow the job (Server-Sent Events from /api/status/ID/events, polling
// /api/status/ID when they break), show the model in <model-viewer>.
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

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Each action (a submitted prompt, an opened example) takes a new number; a job being followed stops as soon as
// the number moves on, so the most recent action owns the page.
let currentAction = 0;

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
    response = await fetch(path, options);
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

function showResult(jobId, title) {
  const viewer = $("viewer");
  $("result-title").textContent = title;
  if (viewerInstalled === false) setViewerState("missing", NOT_INSTALLED);
  else setViewerState("loading", "Loading the 3D model…");
  viewer.setAttribute("poster", assetUrl(jobId, "image"));
  viewer.setAttribute("ios-src", assetUrl(jobId, "usdz")); // AR Quick Look on iPhone and iPad
  viewer.setAttribute("src", assetUrl(jobId, "glb")); // also what Scene Viewer gets on Android
  const downloads = { "dl-image": ["image", "jpg"], "dl-glb": ["glb", "glb"], "dl-usdz": ["usdz", "usdz"] };
  for (const [id, [type, suffix]] of Object.entries(downloads)) {
    $(id).href = assetUrl(jobId, type);
    $(id).download = `${jobId}.${suffix}`;
  }
  $("result").hidden = false;
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
    showResult(jobId, job.prompt);
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

async function submit(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) {
    showError("Describe an object first, for example “a red teapot”.");
    $("prompt").focus();
    return;
  }
  const action = ++currentAction;
  clearError();
  $("result").hidden = true;
  showProgress(0, "Sending");
  let job;
  try {
    job = await api("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt }),
    });
  } catch (error) {
    if (action !== currentAction) return;
    hideProgress();
    showError(error.message);
    return;
  }
  if (action !== currentAction) return;
  await follow(job.job_id, startAction(job.job_id));
}

function exampleCard(example) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.dataset.jobId = example.job_id;
  const image = document.createElement("img");
  image.src = example.image_url;
  image.alt = "";
  image.loading = "lazy";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = example.name;
  const description = document.createElement("span");
  description.className = "description";
  description.textContent = example.description;
  button.append(image, name, description);
  // An example is complete by definition: it opens at once, with no status round trip.
  button.addEventListener("click", () => {
    startAction(example.job_id);
    showResult(example.job_id, example.name);
    $("result").scrollIntoView({ behavior: "smooth", block: "start" });
  });
  item.append(button);
  return item;
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

function resumeFromAddress() {
  const match = /^#job=(.+)$/.exec(location.hash);
  if (match) {
    const jobId = decodeURIComponent(match[1]);
    follow(jobId, startAction(jobId));
  }
}

$("generate-form").addEventListener("submit", submit);
watchViewer();
loadViewer();
loadExamples();
resumeFromAddress();
