// An edit's data, apart from the editor on screen: what a job's record says about its input and
// mask, fetching their bytes back from the server's store, and sending an edit as a job.
// An edit in the settings: {image, mask (Blobs, or null), imageName, maskName (store names, when
// they came from the history), url (to show the input), width, height, strength}.
import { api, ApiError } from "./api.js";

export const fileUrl = (name) => `/v1/images/files/${encodeURIComponent(name)}`;

/** "edit" (img2img) or "inpaint" (under a mask) for an edit, null for a generation. */
export function editKind(edit) {
  if (!edit) return null;
  return edit.mask || edit.maskName ? "inpaint" : "edit";
}

/** The edit a job was: its input and mask by their store names; null for a generation. */
export function editOf(job) {
  const request = job.request || {};
  const images = Array.isArray(request.image) ? request.image : null;
  if (!images) return null;
  const imageName = images[0]?.name ?? null;
  const strength = Number(request.strength ?? NaN);
  return {
    image: null, mask: null, imageName, maskName: request.mask?.name ?? null,
    inpaint: Boolean(request.mask), url: imageName ? fileUrl(imageName) : null,
    width: job.width, height: job.height,
    strength: Number.isFinite(strength) ? strength : null,
  };
}

/** The bytes at a URL (a stored image, or a blob: URL of this page) as a Blob. */
export async function fetchBlob(url) {
  let response;
  try {
    response = await fetch(url);
  } catch {
    throw new ApiError(0, { message: "the server cannot be reached; is the cluster running?" });
  }
  if (!response.ok) {
    throw new ApiError(response.status, {
      message: response.status === 404 ? "the server no longer keeps this image"
        : `the server answered ${response.status} for the image`, param: "image" });
  }
  return response.blob();
}

/** The edit's input and mask as Blobs, fetched from the store (once) when it has only names. */
export async function editBlobs(edit) {
  if (!edit.image) {
    if (!edit.imageName) throw new ApiError(404, { message: "the input image was not kept", param: "image" });
    edit.image = await fetchBlob(fileUrl(edit.imageName));
  }
  if (!edit.mask && edit.maskName) edit.mask = await fetchBlob(fileUrl(edit.maskName));
  return { image: edit.image, mask: edit.mask };
}

const extension = (blob) => ({ "image/jpeg": "jpg", "image/webp": "webp" }[blob.type] || "png");

/** A field's value as multipart text: a list (`loras`) as its JSON, as the server reads it. */
export const formText = (value) => (typeof value === "object" ? JSON.stringify(value) : String(value));

/**
 * POST /v1/jobs/edits as multipart/form-data: the fields of `body` as text, the input as `image`
 * and the mask (if any) as `mask`. Answers the job, as POST /v1/jobs does.
 */
export async function submitEdit(edit, body) {
  const { image, mask } = await editBlobs(edit);
  const form = new FormData();
  for (const [name, value] of Object.entries(body)) {
    if (value !== null && value !== undefined) form.append(name, formText(value));
  }
  form.append("image", image, `input.${extension(image)}`);
  if (mask) form.append("mask", mask, "mask.png");
  return api("/v1/jobs/edits", { method: "POST", form });
}

/** The body that makes a recorded edit again: its fields, without the inputs' descriptions. */
export function editFields(request) {
  const { stream, image, mask, ...fields } = request;
  return fields;
}
