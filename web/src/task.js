// The closedloop behavioural task (jsPsych 8), bundled by esbuild into closedloop/_web/task.js.
//
// The page is index.html?session=ID: it reads sessions/ID.json (written by `closedloop behavior
// build`), runs its trials in the order given there, and POSTs the results to ./results (the
// `closedloop behavior serve` server). Every random choice (trial order, button order) was made
// at build time, so a session runs the same way each time.
import { initJsPsych } from "jspsych";
import HtmlButtonResponse from "@jspsych/plugin-html-button-response";
import HtmlKeyboardResponse from "@jspsych/plugin-html-keyboard-response";
import Preload from "@jspsych/plugin-preload";

const RESULT_FORMAT = "closedloop.behavior_result";

function setState(state) {
  document.body.dataset.state = state;
}

function imageHtml(source, size) {
  return `<img class="stimulus" src="${source}" width="${size}" height="${size}" alt="">`;
}

function blankHtml(size) {
  return `<div class="blank" style="width:${size}px;height:${size}px"></div>`;
}

// A central start button: the participant clicks it to show the next image.
function startPhase(trial, total) {
  return {
    type: HtmlButtonResponse,
    stimulus: `<p class="counter">${trial.index + 1} / ${total}</p>`,
    choices: ["Start"],
    button_html: (choice) => `<button class="jspsych-btn start-btn">${choice}</button>`,
    data: { phase: "start", index: trial.index },
  };
}

function flashPhase(html, duration, phase, index) {
  return {
    type: HtmlKeyboardResponse,
    stimulus: html,
    choices: "NO_KEYS",
    trial_duration: duration,
    data: { phase, index },
  };
}

// Nine (or two) labelled buttons; categorisation puts them on a circle around the centre.
function choicePhase(trial, circle) {
  const n = trial.buttons.length;
  const radius = 190;
  const place = (i) => {
    const angle = (2 * Math.PI * i) / n - Math.PI / 2;
    const x = Math.round(radius * Math.cos(angle));
    const y = Math.round(radius * Math.sin(angle));
    return `left:calc(50% + ${x}px);top:calc(50% + ${y}px)`;
  };
  return {
    type: HtmlButtonResponse,
    stimulus: "",
    choices: trial.buttons,
    button_layout: "flex",
    css_classes: circle ? ["choice-circle"] : ["choice-row"],
    button_html: (choice, i) =>
      `<button class="jspsych-btn choice-btn" data-label="${choice}" data-trial="${trial.index}"` +
      (circle ? ` style="${place(i)}"` : "") +
      `>${choice}</button>`,
    data: { phase: "choice", index: trial.index },
  };
}

function feedbackPhase(trial, duration, jsPsych) {
  return {
    timeline: [flashPhase('<div class="feedback">&#x2717;</div>', duration, "feedback", trial.index)],
    conditional_function: () => {
      const last = jsPsych.data.get().last(1).values()[0];
      return trial.feedback && trial.buttons[last.response] !== trial.answer;
    },
  };
}

function categorizationTrial(trial, session, jsPsych) {
  const size = session.image_px;
  const timing = session.timing_ms;
  const phases = [
    startPhase(trial, session.trials.length),
    flashPhase(imageHtml(trial.stimulus, size), timing.image, "image", trial.index),
    flashPhase(blankHtml(size), timing.blank, "blank", trial.index),
    choicePhase(trial, true),
  ];
  if (trial.feedback) phases.push(feedbackPhase(trial, timing.feedback, jsPsych));
  return phases;
}

function detectionTrial(trial, session) {
  const size = session.image_px;
  const timing = session.timing_ms;
  return [
    startPhase(trial, session.trials.length),
    flashPhase(imageHtml(trial.first, size), timing.image, "image", trial.index),
    flashPhase(blankHtml(size), timing.gap, "blank", trial.index),
    flashPhase(imageHtml(trial.second, size), timing.image, "image2", trial.index),
    choicePhase(trial, false),
  ];
}

// One record per task trial, from the phases jsPsych recorded (time_elapsed: ms since the start).
function summarise(session, jsPsych) {
  const phases = jsPsych.data.get().values().filter((row) => row.index !== undefined);
  return session.trials.map((trial) => {
    const mine = phases.filter((row) => row.index === trial.index);
    const at = (phase) => mine.find((row) => row.phase === phase);
    const choice = at("choice");
    const record = {
      index: trial.index,
      role: trial.role,
      response: trial.buttons[choice.response],
      button: choice.response,
      buttons: trial.buttons,
      rt_ms: choice.rt,
      image_ms: at("image").time_elapsed - at("start").time_elapsed,
      blank_ms: at("blank").time_elapsed - at("image").time_elapsed,
      feedback_shown: at("feedback") !== undefined,
    };
    if (session.kind === "detection") {
      record.image2_ms = at("image2").time_elapsed - at("blank").time_elapsed;
      record.order = trial.order;
      record.first = trial.first;
      record.second = trial.second;
    } else {
      record.stimulus = trial.stimulus;
    }
    return record;
  });
}

async function submit(session, jsPsych) {
  const payload = {
    format: RESULT_FORMAT,
    session: session.session,
    kind: session.kind,
    trials: summarise(session, jsPsych),
  };
  const target = document.getElementById("jspsych-target");
  try {
    const reply = await fetch("results", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
    });
    if (!reply.ok) throw new Error(`server answered ${reply.status}`);
    target.innerHTML = '<p class="done">Thank you! Your responses are saved. You may close this page.</p>';
    setState("saved");
  } catch (error) {
    const link = URL.createObjectURL(new Blob([JSON.stringify(payload)], { type: "application/json" }));
    target.innerHTML =
      `<p class="done">Your responses could not be sent (${error.message}).<br>` +
      `Please <a download="${session.session}.json" href="${link}">download them</a> and send the file to the lab.</p>`;
    setState("failed");
  }
}

function instructions(session) {
  const text =
    session.kind === "detection"
      ? "Each trial shows two images, one quickly after the other. Click <b>same</b> if they were identical, " +
        "<b>different</b> if they differed in any way."
      : "Each trial shows one image for a moment. Then click the button that names what the image showed. " +
        "The first trials are practice: a red &#x2717; tells you when an answer was wrong.";
  return {
    type: HtmlButtonResponse,
    stimulus:
      `<div class="instructions"><h2>Image task</h2><p>${text}</p>` +
      "<p>Click <b>Start</b> in the centre to begin each trial and keep your eyes on the centre of the screen.</p></div>",
    choices: ["Begin"],
    data: { phase: "instructions" },
  };
}

async function main() {
  const params = new URLSearchParams(window.location.search);
  const id = params.get("session");
  const target = document.getElementById("jspsych-target");
  if (!id || !/^[A-Za-z0-9_-]+$/.test(id)) {
    target.innerHTML = '<p class="done">This page needs a session: open index.html?session=ID.</p>';
    setState("failed");
    return;
  }
  const reply = await fetch(`sessions/${id}.json`);
  if (!reply.ok) {
    target.innerHTML = `<p class="done">Unknown session ${id}.</p>`;
    setState("failed");
    return;
  }
  const session = await reply.json();
  const jsPsych = initJsPsych({ display_element: target, on_finish: () => submit(session, jsPsych) });
  const images = session.trials.flatMap((t) => [t.stimulus, t.first, t.second]).filter((s) => s);
  const timeline = [
    { type: Preload, images: [...new Set(images)], message: "Loading images..." },
    instructions(session),
  ];
  for (const trial of session.trials) {
    const phases = session.kind === "detection" ? detectionTrial(trial, session) : categorizationTrial(trial, session, jsPsych);
    timeline.push(...phases);
  }
  setState("running");
  await jsPsych.run(timeline);
}

main();
