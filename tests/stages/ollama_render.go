// Renders an Ollama TEMPLATE the way Ollama hands a chat to it: Go's text/template with
// .System (every system message joined by a blank line) and .Messages (consecutive messages of
// one role merged), read as JSON {"template": ..., "messages": [{"role", "content"}]} lines on
// stdin; writes one JSON string (the rendering) per line. Used by tests/stages/test_modelfile.py.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<24)
	for in.Scan() {
		var req request
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		var system []string
		var merged []*Message
		for i := range req.Messages {
			m := req.Messages[i]
			if m.Role == "system" {
				system = append(system, m.Content)
			}
			if len(merged) > 0 && merged[len(merged)-1].Role == m.Role {
				merged[len(merged)-1].Content += "\n\n" + m.Content
			} else {
				merged = append(merged, &m)
			}
		}
		tpl, err := template.New("").Parse(req.Template)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		var b bytes.Buffer
		data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": merged, "Response": ""}
		if err := tpl.Execute(&b, data); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		out, _ := json.Marshal(b.String())
		fmt.Println(string(out))
	}
}
