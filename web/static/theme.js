// Applied before the page paints (a classic script in <head>): the saved theme, else the system's.
(function () {
  var saved = null;
  try { saved = localStorage.getItem("ortllm.theme"); } catch (e) { /* storage disabled */ }
  var theme = saved || (matchMedia("(prefers-color-scheme: light)").matches ? "light" : "dark");
  document.documentElement.dataset.theme = theme;
  document.getElementById("hl-dark").disabled = theme !== "dark";
  document.getElementById("hl-light").disabled = theme !== "light";
})();
