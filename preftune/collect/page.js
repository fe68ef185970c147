// preftune label: the page. Plain JavaScript, no build step, no libraries.
//
// Every text from the server (prompts, responses, guidelines, errors) is put in the page with
// textContent or createTextNode, never as HTML (this file never uses innerHTML): a response
// holding <img src=x onerror=...> shows those characters. The server saves each label before it answers with the next task, so what
// the page shows next is always after the previous label is on disk.
"use strict";

(() => {
  const params = new URLSearchParams(window.location.search);
  const annotator = params.get("annotator") || "";
  const token = params.get("token") || "";
  const $ = (id) => document.getElementById(id);

  let current = null;      // the task shown: {task_id, mode, prompt, responses, display_order}
  let busy = false;        // a request is in flight: keys and buttons wait
  let rankOrder = [];      // rank mode: display positions, best first (the list as shown)
  let ranked = 0;          // rank mode: how many of rankOrder the annotator has placed

  const KEYS = {  // [keys, what they do] per mode
    pair: [[["1", "←"], "left better"], [["2", "→"], "right better"], [["t"], "tie"], [["s"], "skip / both bad"],
           [["u"], "undo"]],
    rank: [[["1", "…", "9"], "pick best first (or drag)"], [["Backspace"], "take back a pick"],
           [["Enter"], "save the ranking"], [["s"], "skip"], [["u"], "undo"]],
    thumbs: [[["1", "↑"], "good"], [["2", "↓"], "bad"], [["s"], "skip"], [["u"], "undo"]],
  };

  function showKeys(mode) {
    const line = $("keys");
    line.replaceChildren();
    KEYS[mode].forEach(([keys, what], i) => {
      if (i) line.append(" · ");
      keys.forEach((key, j) => {
        if (j) line.append("/");
        const k = document.createElement("kbd");
        k.textContent = key;
        line.append(k);
      });
      line.append(` ${what}`);
    });
  }

  function setState(state) { document.body.dataset.state = state; }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function notice(message) {
    const box = $("notice");
    box.textContent = message;
    box.hidden = !message;
  }

  async function api(method, path, body) {
    const headers = { "Accept": "application/json" };
    if (token) headers["X-Preftune-Token"] = token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, cache: "no-store", credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await response.json(); } catch (err) { data = null; }
    if (!response.ok) {
      let detail = data && data.detail !== undefined ? data.detail : response.statusText;
      if (typeof detail !== "string") detail = JSON.stringify(detail);
      throw new Error(`${response.status}: ${detail}`);
    }
    return data;
  }

  // A prompt or response: text, or a list of {role, content} messages.
  function renderText(container, value) {
    container.replaceChildren();
    if (typeof value === "string") {
      container.textContent = value;
      return;
    }
    for (const message of value) {
      const block = document.createElement("div");
      block.className = "message";
      const role = document.createElement("span");
      role.className = "role";
      role.textContent = String(message.role);
      const content = document.createElement("div");
      content.textContent = String(message.content);
      block.append(role, content);
      container.append(block);
    }
  }

  function textBox(value) {
    const box = document.createElement("div");
    box.className = "text";
    renderText(box, value);
    return box;
  }

  function button(label, key, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    if (key) {
      const k = document.createElement("kbd");
      k.textContent = key;
      b.append(" ", k);
    }
    b.addEventListener("click", onClick);
    return b;
  }

  function showProgress(p) {
    if (!p) return;
    $("progress").textContent =
      `${p.labelled_by_you} labelled by you · ${p.left_for_you} left for you · ` +
      `${p.tasks_complete} of ${p.tasks} tasks complete (${p.overlap} annotator${p.overlap === 1 ? "" : "s"} each)`;
  }

  function show(data) {
    showProgress(data.progress);
    current = data.task;
    $("reason").value = "";
    if (!current) {
      $("task").hidden = true;
      $("done").hidden = false;
      $("done-text").textContent = `Thank you, ${annotator}: there is no task left for you right now.`;
      document.body.dataset.taskId = "";
      setState("done");
      return;
    }
    $("done").hidden = true;
    $("task").hidden = false;
    renderText($("prompt"), current.prompt);
    const responses = $("responses");
    responses.replaceChildren();
    responses.className = current.mode;
    const controls = $("controls");
    controls.replaceChildren();
    if (current.mode === "pair") {
      $("responses-title").textContent = "Which response is better?";
      ["1 · left", "2 · right"].forEach((head, position) => {
        const column = document.createElement("div");
        column.className = "response";
        column.dataset.position = String(position);
        const h = document.createElement("div");
        h.className = "response-head";
        h.textContent = head;
        column.append(h, textBox(current.responses[position]));
        responses.append(column);
      });
      controls.append(button("Left is better", "1", () => act("left")),
                      button("Right is better", "2", () => act("right")),
                      button("Tie", "t", () => act("tie")),
                      button("Skip / both bad", "s", () => act("skip")));
    } else if (current.mode === "thumbs") {
      $("responses-title").textContent = "Is this response good?";
      const column = document.createElement("div");
      column.className = "response";
      column.dataset.position = "0";
      column.append(textBox(current.responses[0]));
      responses.append(column);
      controls.append(button("Good", "1", () => act("up")), button("Bad", "2", () => act("down")),
                      button("Skip", "s", () => act("skip")));
    } else {
      $("responses-title").textContent = "Rank the responses, best first";
      rankOrder = current.responses.map((_, position) => position);
      ranked = 0;
      const list = document.createElement("ol");
      list.id = "ranking";
      responses.append(list);
      renderRanking();
      controls.append(button("Save ranking", "Enter", () => submitRanking()),
                      button("Skip", "s", () => act("skip")));
    }
    controls.append(button("Undo", "u", () => act("undo")));
    showKeys(current.mode);
    document.body.dataset.taskId = String(current.task_id);
    setState("ready");
  }

  // ------------------------------------------------------------------ rank mode

  let dragFrom = null;

  function renderRanking() {
    const list = $("ranking");
    list.replaceChildren();
    rankOrder.forEach((position, index) => {
      const item = document.createElement("li");
      item.className = "response";
      item.draggable = true;
      item.dataset.position = String(position);
      const badge = document.createElement("div");
      badge.className = "badge";
      badge.append(document.createTextNode(`Response ${position + 1}`));
      if (index < ranked) {
        const rank = document.createElement("span");
        rank.className = "rank";
        rank.textContent = `rank ${index + 1}`;
        badge.append(rank);
      }
      item.append(badge, textBox(current.responses[position]));
      item.addEventListener("dragstart", () => { dragFrom = index; item.classList.add("dragging"); });
      item.addEventListener("dragend", () => item.classList.remove("dragging"));
      item.addEventListener("dragover", (event) => event.preventDefault());
      item.addEventListener("drop", (event) => {
        event.preventDefault();
        if (dragFrom === null || dragFrom === index) return;
        const [moved] = rankOrder.splice(dragFrom, 1);
        rankOrder.splice(index, 0, moved);
        ranked = rankOrder.length;  // a dragged list is a full ranking, top to bottom
        dragFrom = null;
        renderRanking();
      });
      list.append(item);
    });
  }

  function pick(position) {
    const at = rankOrder.indexOf(position);
    if (at < 0 || at < ranked) return;  // no such response, or already placed
    rankOrder.splice(at, 1);
    rankOrder.splice(ranked, 0, position);
    ranked += 1;
    if (ranked === rankOrder.length - 1) ranked = rankOrder.length;  // the last one places itself
    renderRanking();
  }

  function unpick() {
    if (ranked > 0) {
      ranked = ranked === rankOrder.length ? rankOrder.length - 2 : ranked - 1;
      if (ranked < 0) ranked = 0;
      renderRanking();
    }
  }

  function submitRanking() {
    if (ranked < rankOrder.length) {
      notice("Rank every response first: press their numbers best first, or drag them into order.");
      return;
    }
    act("rank");
  }

  // ------------------------------------------------------------------ actions

  async function act(choice) {
    if (busy || (choice !== "undo" && !current)) return;
    busy = true;
    setState("busy");
    showError("");
    notice("");
    try {
      let data;
      if (choice === "undo") {
        data = await api("POST", "api/undo", { annotator });
        if (data.undone === null) notice("Nothing to undo.");
        else notice("Undone: the task is shown again.");
      } else {
        data = await api("POST", "api/label", {
          annotator, task_id: current.task_id, display_order: current.display_order, choice,
          ranking: choice === "rank" ? rankOrder.slice() : null, reason: $("reason").value,
        });
      }
      show(data);
    } catch (err) {
      showError(`Not saved: ${err.message}`);
      setState(current ? "ready" : "done");
    } finally {
      busy = false;
    }
  }

  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT")) {
      if (event.key === "Escape") target.blur();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat || !annotator) return;
    const key = event.key;
    let handled = true;
    if (key === "u" || key === "U") act("undo");
    else if (!current) handled = false;
    else if (key === "s" || key === "S") act("skip");
    else if (current.mode === "pair") {
      if (key === "1" || key === "ArrowLeft") act("left");
      else if (key === "2" || key === "ArrowRight") act("right");
      else if (key === "t" || key === "T") act("tie");
      else handled = false;
    } else if (current.mode === "thumbs") {
      if (key === "1" || key === "ArrowUp" || key === "+") act("up");
      else if (key === "2" || key === "ArrowDown" || key === "-") act("down");
      else handled = false;
    } else if (/^[1-9]$/.test(key) && !busy) pick(Number(key) - 1);
    else if (key === "Backspace" && !busy) unpick();
    else if (key === "Enter") submitRanking();
    else handled = false;
    if (handled) event.preventDefault();
  });

  async function start() {
    if (!annotator) {
      $("login").hidden = false;
      $("login-token").value = token;
      if (!token) $("login-token").remove();
      setState("login");
      return;
    }
    $("who").textContent = annotator;
    try {
      const config = await api("GET", "api/config");
      $("title").textContent = config.title;
      document.title = `${config.title} · ${annotator}`;
      if (config.guidelines) {
        $("guidelines").textContent = config.guidelines;
        $("guidelines-box").hidden = false;
      }
      show(await api("POST", "api/next", { annotator }));
    } catch (err) {
      showError(`Cannot start: ${err.message}`);
      setState("error");
    }
  }

  start();
})();
