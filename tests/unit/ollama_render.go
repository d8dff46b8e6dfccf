// Renders an Ollama TEMPLATE with Go's text/template the way Ollama (server/routes.go, template/template.go)
// prepares a prompt, so tests can compare it with the Hugging Face chat template's rendering.
//
// Input (stdin, JSON): {"template": "...", "system": "SYSTEM line of the Modelfile or empty",
//                      "messages": [{"role": ..., "content": ...}] (chat) or "prompt": "..." (generate)}
// Output (stdout): the rendered prompt.
//
// Chat: like Ollama's ChatHandler, the Modelfile's SYSTEM becomes the first message when the request has no
// system message; like template.Execute, consecutive messages of one role are collated, and a template that uses
// .Messages gets Messages, System (all system contents) and an empty Response. Generate: the legacy values
// System, Prompt, Response (empty). Ollama's parse options and its template functions (json) are reproduced.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string     `json:"template"`
	System   string     `json:"system"`
	Messages []*Message `json:"messages"`
	Prompt   string     `json:"prompt"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

// usesMessages reports whether the template refers to .Messages (Ollama's Vars check).
func usesMessages(node parse.Node) bool {
	found := false
	var walk func(n parse.Node)
	walk = func(n parse.Node) {
		if found || n == nil {
			return
		}
		switch n := n.(type) {
		case *parse.ListNode:
			for _, c := range n.Nodes {
				walk(c)
			}
		case *parse.ActionNode:
			walk(n.Pipe)
		case *parse.PipeNode:
			for _, c := range n.Cmds {
				walk(c)
			}
		case *parse.CommandNode:
			for _, a := range n.Args {
				walk(a)
			}
		case *parse.FieldNode:
			for _, id := range n.Ident {
				if strings.ToLower(id) == "messages" {
					found = true
				}
			}
		case *parse.IfNode:
			walk(n.Pipe)
			walk(n.List)
			walk(n.ElseList)
		case *parse.RangeNode:
			walk(n.Pipe)
			walk(n.List)
			walk(n.ElseList)
		case *parse.WithNode:
			walk(n.Pipe)
			walk(n.List)
			walk(n.ElseList)
		}
	}
	walk(node)
	return found
}

func collate(msgs []*Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		msg := msgs[i]
		if msg.Role == "system" {
			system = append(system, msg.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msg.Role {
			collated[len(collated)-1].Content += "\n\n" + msg.Content
		} else {
			copied := *msg
			collated = append(collated, &copied)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template does not parse:", err)
		os.Exit(1)
	}
	var values map[string]any
	if in.Messages != nil {
		if !usesMessages(tmpl.Tree.Root) {
			fmt.Fprintln(os.Stderr, "the template does not use .Messages")
			os.Exit(1)
		}
		msgs := in.Messages
		if in.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
			msgs = append([]*Message{{Role: "system", Content: in.System}}, msgs...)
		}
		system, collated := collate(msgs)
		values = map[string]any{"System": system, "Messages": collated, "Response": "", "Prompt": ""}
	} else {
		values = map[string]any{"System": in.System, "Prompt": in.Prompt, "Response": "", "Messages": []*Message{}}
	}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		fmt.Fprintln(os.Stderr, "template does not execute:", err)
		os.Exit(1)
	}
}
